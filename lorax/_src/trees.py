"""Split a LoRA tree into trainable and frozen halves, join them, merge adapters in or out."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lorax._src.bases.quantized import is_frozen_base
from lorax._src.kinds.adapter import Adapter
from lorax._src.paths import named_leaves, render
from lorax._src.trainable import Trainable, is_lorax_node, is_node


def _is_leaf(x) -> bool:
    return x is None or is_node(x)


def _map(fn, *trees):
    """Map ``fn(name, *nodes)`` over lorax nodes and leaves of trees of one structure."""
    names = [[render(p) for p, _ in jax.tree_util.tree_flatten_with_path(t, is_leaf=_is_leaf)[0]]
             for t in trees]
    for other in names[1:]:
        if other != names[0]:
            first = next((a, b) for a, b in zip(names[0] + ["<end>"], other + ["<end>"]) if a != b)
            raise ValueError(f"lorax: trees differ in structure: first difference at {first[0]!r} "
                             f"against {first[1]!r}.")
    counter = iter(names[0])
    return jax.tree.map(lambda *xs: fn(next(counter), *xs), *trees, is_leaf=_is_leaf)


def holds_banks(params: Any, who: str) -> bool:
    """Whether the adapters of ``params`` are banks of named adapters (`Adapter.several`): True
    when all of them are, False when none is; a tree mixing the two is refused, naming a bank."""
    adapters = [(path, leaf) for path, leaf in named_leaves(params) if isinstance(leaf, Adapter)]
    banks = [(path, leaf) for path, leaf in adapters if leaf.several]
    if banks and len(banks) < len(adapters):
        path, leaf = banks[0]
        raise ValueError(f"{who}: {path!r} is a {type(leaf).__name__}, a bank of several named adapters, among "
                         "single adapters; bank every adapted weight (lorax.adapters.bank).")
    return bool(banks)


def split(params: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees of ``params``' structure with ``None`` holes.

    ``trainable`` holds each adapter's trained arrays (its frozen fields ``None``) and
    `Trainable` leaves; ``frozen`` holds every frozen field (trained ones ``None``) and plain
    leaf. Differentiate with respect to ``trainable``.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> trainable, frozen = lorax.split({"w": lw, "bias": jnp.zeros(3)})
    >>> trainable["bias"] is None, trainable["w"].w is None, frozen["w"].a is None
    (True, True, True)
    """

    def halves(name, x):
        if isinstance(x, Adapter):
            return (x.replace(**dict.fromkeys(x.frozen_fields())),
                    x.replace(**dict.fromkeys(x.trained_fields())))
        if isinstance(x, Trainable):
            return x, None
        return None, x

    pairs = _map(lambda name, x: _Pair(halves(name, x)), params)
    return tuple(jax.tree.map(lambda pair, k=k: pair.halves[k], pairs) for k in (0, 1))


@dataclasses.dataclass(frozen=True)
class _Pair:
    """Not a pytree: holds both halves of one leaf while `split` maps over the tree."""

    halves: tuple


def combine(trainable: Any, frozen: Any) -> Any:
    """Join the halves made by `split` back into one tree.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> params = lorax.combine(*lorax.split({"w": lw}))
    >>> params["w"].w.shape
    (4, 3)
    """

    def join(name, t, f):
        if isinstance(t, Adapter) and isinstance(f, Adapter):
            holes = [getattr(t, n) for n in t.frozen_fields()] + [getattr(f, n) for n in f.trained_fields()]
            if type(t) is not type(f) or any(h is not None for h in holes) or t.meta != f.meta:
                raise ValueError(f"lorax.combine: {name!r}: the trainable and frozen {type(t).__name__}s "
                                 "do not come from one split (their kind, metadata or halves differ).")
            joined = t.replace(**{n: getattr(f, n) for n in f.frozen_fields()})
            joined.check(name)
            return joined
        if t is None and f is not None:
            if is_lorax_node(f):
                raise ValueError(f"lorax.combine: {name!r} is missing from the trainable tree.")
            return f
        if f is None and isinstance(t, Trainable):
            return t
        raise ValueError(f"lorax.combine: {name!r} is {_kind(t)} in trainable and {_kind(f)} in "
                         "frozen; expected the two halves of lorax.split.")

    return _map(join, trainable, frozen)


def _kind(x) -> str:
    return "None" if x is None else type(x).__name__


def merge(params: Any) -> Any:
    """The plain tree: each adapter becomes the weight it stands for (``w + scale * a @ b``
    for LoRA) in ``w``'s dtype, each quantized weight its dequantized value (full precision;
    `lorax.merge_quantized` quantizes merged weights again).

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=2.0)
    >>> lorax.merge({"w": lw})["w"].tolist()
    [[2.0, 2.0], [2.0, 2.0]]
    """

    def plain(name, x):
        if isinstance(x, Adapter):
            x.check(name)
            try:
                return x.merged()
            except ValueError as err:
                raise ValueError(f"lorax.merge: {name!r}: {err}") from None
        if is_frozen_base(x):
            return x.dequantize()
        return x.value if isinstance(x, Trainable) else x

    return _map(plain, params)


def unmerge(merged: Any, adapters: Any) -> Any:
    """Recover the LoRA tree from a merged tree and the adapters (``lorax.split(params)[0]``, or
    the whole LoRA tree: a VeRA update needs the shared projections that only the frozen half holds).

    Exact for kinds whose merge adds a delta that does not depend on ``w`` (LoRA); a DoRA
    merge rescales ``w`` itself, so `unmerge` refuses it (`Adapter.unmerged`).

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)))
    >>> trainable, _ = lorax.split({"w": lw})
    >>> lorax.unmerge(lorax.merge({"w": lw}), trainable)["w"].w.tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """

    def unfold(name, t, m):
        if isinstance(t, Adapter):
            restored = t.replace(w=t.unmerged(m, name))
            restored.check(name)
            return restored
        if isinstance(t, Trainable):
            return Trainable(m)
        if t is not None and not hasattr(t, "shape"):  # a frozen leaf of the whole tree: merged holds it too
            raise ValueError(f"lorax.unmerge: {name!r} in adapters is {_kind(t)}; expected None, an array, "
                             "an adapter or a Trainable (pass lorax.split(params)[0], or the LoRA tree).")
        return m

    return _map(unfold, adapters, merged)
