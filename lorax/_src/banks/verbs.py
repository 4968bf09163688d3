"""`lorax.adapters`: several named LoRA adapters of one base in one tree.

A *bank tree* is the base's tree with a `LoraBank` in place of every weight some adapter
adapts. It is built from single-adapter trees (from `lorax.init`, `lorax.load` or
`lorax.peft.load_peft`) and stays a pure params-in/params-out value: `select` gives back an
ordinary single-adapter tree (everything else in lorax applies to it), `route` sets which
adapter each example uses for `lorax.lora`.

>>> import jax, jax.numpy as jnp, lorax
>>> fn = lambda p, x: x @ p["w"]
>>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
>>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
>>> params = lorax.adapters.bank({"math": one(0), "code": one(1)})
>>> lorax.lora(fn)(lorax.adapters.route(params, ["code", "math"]), x).shape  # one adapter per example
(2, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src import compat
from lorax._src.kinds.adapter import RANK
from lorax._src.kinds.bank import BASE, LoraBank
from lorax._src.kinds.initializers import makes_residual
from lorax._src.kinds.lora import LoraWeight
from lorax._src.paths import named_leaves
from lorax._src.trainable import is_node
from lorax._src.trees import _map
from lorax._src.validate import check_plain_name

Index = str | int | None | Sequence[str | int | None] | jax.Array


def names(params: Any) -> tuple[str, ...]:
    """The adapter names of a bank tree, in index order.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> lorax.adapters.names(lorax.adapters.bank({"math": one(0), "code": one(1)}))
    ('math', 'code')
    """
    found = {leaf.names for _, leaf in named_leaves(params) if isinstance(leaf, LoraBank)}
    if not found:
        raise ValueError("lorax.adapters: params hold no LoraBank; make a bank tree with "
                         "lorax.adapters.bank({name: params, ...}).")
    if len(found) > 1:
        raise ValueError(f"lorax.adapters: the banks of params name different adapters {sorted(found)}; "
                         "build bank trees with lorax.adapters only.")
    return found.pop()


def base(params: Any) -> Any:
    """The plain base tree of a bank tree (to pass to `lorax.init` for a new adapter).

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> params = lorax.adapters.bank({"math": lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, x)})
    >>> plain = lorax.adapters.base(params)
    >>> type(params["w"]).__name__, bool((plain["w"] == base["w"]).all())
    ('LoraBank', True)
    """
    names(params)
    return _map(lambda path, x: x.w if isinstance(x, LoraBank) else x, params)


def check_name(name: Any, who: str) -> str:
    """``name`` if it can name an adapter: one plain folder name (it names a folder on save),
    else a ValueError from ``who``. Every function that takes or makes an adapter name checks
    it here."""
    return check_plain_name(name, f"{who}: adapter name")


def _position(params: Any, name: str, who: str) -> int:
    check_name(name, who)
    current = names(params)
    if name not in current:
        raise ValueError(f"{who}: no adapter {name!r}; the bank holds {list(current)}.")
    return current.index(name)


def _refuse(path: str, x: Any, who: str) -> None:
    """Only plain LoRA adapters on the original base go into a bank."""
    if is_node(x) and type(x) is not LoraWeight:
        raise ValueError(f"{who}: {path!r} is a {type(x).__name__}; a bank holds plain LoRA adapters "
                         "(LoraWeight) only.")
    if isinstance(x, LoraWeight) and makes_residual(x.init):
        raise ValueError(f"{who}: {path!r} was initialised with {x.init}, so its frozen w is a residual, not "
                         "the base; banks hold adapters of one unchanged base.")


def _same(path: str, have: Any, got: Any, who: str, values: bool) -> None:
    """``got`` must be the bank's base leaf ``have`` (shape, dtype, and values when ``values``)."""
    shape = lambda x: (tuple(jnp.shape(x)), str(getattr(x, "dtype", type(x).__name__)))  # noqa: E731
    if shape(have) != shape(got):
        raise ValueError(f"{who}: {path!r} is {shape(got)} in the new adapter's tree but {shape(have)} in the "
                         "bank: the adapter is for another base.")
    if values and have is not got and not compat.is_tracer(have) and not compat.is_tracer(got) \
            and not bool(jnp.array_equal(have, got)):
        raise ValueError(f"{who}: {path!r}: the new adapter's frozen weight differs from the bank's base: the "
                         "adapter is for another base.")


def _one(lw: LoraWeight, rank: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``lw``'s factors with an adapters axis of one (its first ``rank`` ranks: 0 for none)."""
    a, b = lw.first_ranks(lw.rank if rank is None else rank)
    axis = len(lw.stack_axes)  # where a bank's adapters axis sits
    return jnp.expand_dims(a, axis), jnp.expand_dims(b, axis)


def _append(bank: LoraBank, name: str, a: jax.Array, b: jax.Array, scale: Any, rank: int) -> LoraBank:
    """``bank`` with one more adapter: ``a``/``b`` laid out as the bank's, with one adapter."""
    axis, width = bank.adapter_axis, max(bank.rank, a.shape[-1])
    pad = lambda x, at: jnp.pad(x, [(0, width - x.shape[at]) if i == at else (0, 0)  # noqa: E731
                                    for i in range(x.ndim)])
    scales = jnp.concatenate([bank.scales, jnp.asarray([scale], bank.scales.dtype)])
    return bank.replace(a=jnp.concatenate([pad(bank.a, bank.a.ndim - 1), pad(a, a.ndim - 1)], axis),
                        b=jnp.concatenate([pad(bank.b, axis + 1), pad(b, axis + 1)], axis),
                        scales=scales, ranks=jnp.concatenate([bank.ranks, jnp.asarray([rank], bank.ranks.dtype)]),
                        names=(*bank.names, name))


def _zero(bank: LoraBank) -> tuple[jax.Array, jax.Array]:
    """Factors of one adapter of rank 0 in ``bank``'s layout (an adapter that leaves w alone)."""
    a, b = bank.first_ranks(0)
    return jnp.take(a, jnp.arange(1), bank.adapter_axis), jnp.take(b, jnp.arange(1), bank.adapter_axis)


def _empty(lw: LoraWeight, current: tuple[str, ...]) -> LoraBank:
    """A bank for ``lw``'s weight holding the ``current`` adapters, none of which adapts it."""
    none = lambda x: jnp.take(x, jnp.arange(0), len(lw.stack_axes))  # noqa: E731
    a, b = _one(lw)
    bank = LoraBank(lw.w, none(a), none(b), jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32), a_axes=lw.a_axes,
                    b_axes=lw.b_axes, stack_axes=lw.stack_axes, dropout=lw.dropout)
    for name in current:
        a, b = _zero(bank) if bank.names else _one(lw, 0)
        bank = _append(bank, name, a, b, 0.0, 0)
    return bank


def _start(path: str, x: Any, name: str) -> Any:
    _refuse(path, x, "lorax.adapters.bank")
    if not isinstance(x, LoraWeight):
        return x
    return _append(_empty(x, ()), name, *_one(x), x.scale, x.rank)


def bank(named: dict[str, Any]) -> Any:
    """A bank tree holding each single-adapter tree of ``named`` under its name.

    The trees must adapt one base (the same plain leaves and frozen weights); each may
    adapt its own weights with its own ranks and scales. Only plain LoRA adapters (`LoraWeight`,
    not DoRA nor PiSSA/OLoRA, whose frozen weight is not the base) go into a bank.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["q"] @ p["v"]
    >>> base, x = {"q": jnp.ones((4, 4)), "v": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> only = lambda targets, rank: lorax.init(jax.random.key(0), lorax.LoraConfig(rank, targets=targets), fn, base, x)
    >>> params = lorax.adapters.bank({"math": only("q", 2), "code": only(["q", "v"], 1)})
    >>> params["q"].names, params["q"].adapter_ranks, params["v"].adapter_ranks  # rank 0: not adapted
    (('math', 'code'), (2, 1), (0, 1))
    """
    if not isinstance(named, dict) or not named:
        raise ValueError("lorax.adapters.bank: pass a non-empty dict {name: single-adapter params}.")
    for name in named:
        check_name(name, "lorax.adapters.bank")
    (first_name, first), *rest = named.items()
    out = _map(lambda path, x: _start(path, x, first_name), first)
    if not any(isinstance(leaf, LoraBank) for _, leaf in named_leaves(out)):
        raise ValueError(f"lorax.adapters.bank: {first_name!r} holds no LoraWeight.")
    for name, tree in rest:
        out = add(out, name, tree)
    return out


def add(params: Any, name: str, adapters: Any) -> Any:
    """The bank tree ``params`` with the single-adapter tree ``adapters`` added as ``name``.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((8, 6))}, jnp.ones((1, 8))
    >>> one = lambda rank: lorax.init(jax.random.key(rank), lorax.LoraConfig(rank=rank), fn, base, x)
    >>> params = lorax.adapters.add(lorax.adapters.bank({"small": one(2)}), "big", one(4))
    >>> params["w"].adapter_ranks, params["w"].a.shape  # ranks padded to the largest
    ((2, 4), (2, 8, 4))
    """
    check_name(name, "lorax.adapters.add")
    current = names(params)
    if name in current:
        raise ValueError(f"lorax.adapters.add: the bank already holds an adapter {name!r}; delete or rename it "
                         "first.")
    who = "lorax.adapters.add"

    def one(path, x, y):
        _refuse(path, y, who)
        if isinstance(x, LoraBank):
            if not isinstance(y, LoraWeight):
                _same(path, x.w, y, who, values=True)
                return _append(x, name, *_zero(x), 0.0, 0)
            _same(path, x.w, y.w, who, values=True)
            if (x.a_axes, x.b_axes, x.stack_axes) != (y.a_axes, y.b_axes, y.stack_axes):
                raise ValueError(f"{who}: {path!r}: the adapter's axes (a {y.a_axes}, b {y.b_axes}, stack "
                                 f"{y.stack_axes}) differ from the bank's (a {x.a_axes}, b {x.b_axes}, stack "
                                 f"{x.stack_axes}).")
            return _append(x, name, *_one(y), y.scale, y.rank)
        if isinstance(y, LoraWeight):
            _same(path, x, y.w, who, values=True)
            return _append(_empty(y, current), name, *_one(y), y.scale, y.rank)
        _same(path, x, y, who, values=False)
        return x

    return _map(one, params, adapters)


def _keep(params: Any, keep: list[int]) -> Any:
    """The bank tree with only the adapters at positions ``keep``, factors trimmed to their ranks."""

    def trim(x):
        if not isinstance(x, LoraBank):
            return x
        ranks = tuple(x.adapter_ranks[i] for i in keep)
        width, axis, at = max(ranks, default=0), x.adapter_axis, jnp.asarray(keep, jnp.int32)
        a = jnp.take(x.a, at, axis)[..., :width]
        b = jnp.moveaxis(jnp.moveaxis(jnp.take(x.b, at, axis), axis + 1, 0)[:width], 0, axis + 1)
        return x.replace(a=a, b=b, scales=x.scales[at], ranks=x.ranks[at], names=tuple(x.names[i] for i in keep),
                         index=None)

    return jax.tree.map(trim, params, is_leaf=is_node)


def delete(params: Any, name: str) -> Any:
    """The bank tree without adapter ``name``; deleting the last one gives the plain base.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> params = lorax.adapters.delete(lorax.adapters.bank({"math": one(0), "code": one(1)}), "math")
    >>> lorax.adapters.names(params), type(lorax.adapters.delete(params, "code")["w"]).__name__
    (('code',), 'ArrayImpl')
    """
    gone = _position(params, name, "lorax.adapters.delete")
    keep = [i for i in range(len(names(params))) if i != gone]
    return _keep(params, keep) if keep else base(params)


def rename(params: Any, old: str, new: str) -> Any:
    """The bank tree with adapter ``old`` called ``new`` (one plain folder name, as every
    adapter name: it names a folder when the bank is saved).

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> params = lorax.adapters.bank({"math": lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, x)})
    >>> lorax.adapters.names(lorax.adapters.rename(params, "math", "algebra"))
    ('algebra',)
    """
    at = _position(params, old, "lorax.adapters.rename")
    check_name(new, "lorax.adapters.rename")
    if new in names(params) and new != old:
        raise ValueError(f"lorax.adapters.rename: the bank already holds an adapter {new!r}.")
    renamed = lambda x: x.replace(names=tuple(new if i == at else n for i, n in enumerate(x.names)))  # noqa: E731
    return jax.tree.map(lambda x: renamed(x) if isinstance(x, LoraBank) else x, params, is_leaf=is_node)


def _concrete_scale(path: str, scale: jax.Array, who: str) -> float:
    if compat.is_tracer(scale):
        raise TypeError(f"{who}: {path!r} holds traced scales (a call under jit?); select adapters outside jit, "
                        "or route the bank inside it (lorax.adapters.route).")
    return float(scale)


def select(params: Any, which: str | Sequence[str]) -> Any:
    """An ordinary single-adapter tree: adapter ``which``, or the sum of several (ranks add).

    Weights that the chosen adapters do not adapt come back plain. Use it outside ``jit``
    (to merge, train, save or export one adapter); inside ``jit``, `route` instead.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> params = lorax.adapters.bank({"math": one(0), "code": one(1)})
    >>> both = lorax.adapters.select(params, ["math", "code"])
    >>> type(lorax.adapters.select(params, "code")["w"]).__name__, both["w"].rank
    ('LoraWeight', 4)
    """
    who = "lorax.adapters.select"
    if not isinstance(which, (str, Sequence)):
        raise TypeError(f"{who}: which must be an adapter name or a sequence of names, got {which!r} "
                        f"({type(which).__name__}).")
    chosen = [which] if isinstance(which, str) else list(which)
    at = [_position(params, n, who) for n in chosen]
    if not at or len(set(at)) != len(at):
        raise ValueError(f"{who}: choose one adapter name or distinct names, got {which!r}.")

    def pick(path, x):
        if not isinstance(x, LoraBank):
            return x
        ranks = x.adapter_ranks
        present = [i for i in at if ranks[i]]
        if not present:
            return x.w
        def own(i: int) -> tuple[LoraWeight, jax.Array]:
            """Adapter ``i`` at its own rank (scale 1), and its scale."""
            a, b, scale = x.chosen(jnp.asarray(i))
            one = LoraWeight(x.w, a, b, a_axes=x.a_axes, b_axes=x.b_axes, stack_axes=x.stack_axes, dropout=x.dropout)
            a, b = one.first_ranks(ranks[i])
            return one.replace(a=a, b=b), scale

        parts = [own(i) for i in present]
        first, scale = parts[0]
        if len(present) == 1:
            return first.replace(scale=_concrete_scale(path, scale, who))
        a = jnp.concatenate([one.a for one, _ in parts], first.axis("a", RANK))
        b = jnp.concatenate([(one.b * s).astype(one.b.dtype) for one, s in parts], first.axis("b", RANK))
        return first.replace(a=a, b=b)

    return _map(pick, params)


def index_of(params: Any, which: str | None | Sequence[str | None]) -> jax.Array:
    """The int32 index of adapter name(s) ``which`` (None: `BASE`, the base alone): a scalar
    for one name, ``[batch]`` for one name per example.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> params = lorax.adapters.bank({"math": one(0), "code": one(1)})
    >>> lorax.adapters.index_of(params, ["code", None, "math"]).tolist()
    [1, -1, 0]
    """
    current = names(params)
    single = which is None or isinstance(which, str)
    if not single and not isinstance(which, Sequence):
        raise TypeError(f"lorax.adapters.index_of: which must be an adapter name, None, or a sequence of them, "
                        f"got {which!r} ({type(which).__name__}).")
    wanted = [which] if single else list(which)  # type: ignore[arg-type]
    for n in wanted:
        if n is not None:
            check_name(n, "lorax.adapters.index_of")
        if n is not None and n not in current:
            raise ValueError(f"lorax.adapters.index_of: no adapter {n!r}; the bank holds {list(current)} "
                             "(None selects the base alone).")
    index = np.asarray([BASE if n is None else current.index(n) for n in wanted], np.int32)
    return jnp.asarray(index[0] if single else index)


def route(params: Any, index: Index) -> Any:
    """The bank tree with every bank routed by ``index``: which adapter each example uses.

    ``index`` is an adapter name (or None, the base alone) for the whole batch, a list of
    them per example, or an int array (a scalar or ``[batch]``, as `index_of` gives;
    `BASE` = -1 selects the base). Examples lie along the leading axis of the activations
    that meet each weight. The index is an ordinary array in the tree, so under ``jit``
    another index (or another bank of the same shapes) reuses the compiled program.
    A concrete index out of range is refused; under ``jit`` it cannot be checked, and any
    traced entry outside ``[0, n)`` selects the base alone, as `BASE` does.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((3, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> params = lorax.adapters.bank({"math": one(0), "code": one(1)})
    >>> mixed = lorax.lora(fn)(lorax.adapters.route(params, ["code", None, "math"]), x)
    >>> bool(jnp.allclose(mixed[1], fn(base, x)[1]))
    True
    """
    current = names(params)
    if index is None or isinstance(index, str) or (isinstance(index, (list, tuple)) and any(
            i is None or isinstance(i, str) for i in index)):
        index = index_of(params, index)  # type: ignore[arg-type]
    index = jnp.asarray(index)
    if not jnp.issubdtype(index.dtype, jnp.integer) or index.ndim > 1:
        raise ValueError(f"lorax.adapters.route: index must be an int scalar or [batch] int array, got "
                         f"{index.dtype} {index.shape}.")
    if not compat.is_tracer(index):
        bad = np.asarray(index)[(np.asarray(index) < BASE) | (np.asarray(index) >= len(current))]
        if bad.size:
            raise ValueError(f"lorax.adapters.route: index holds {sorted(set(bad.tolist()))}, outside "
                             f"[{BASE}, {len(current)}) for the adapters {list(current)} ({BASE}: the base alone).")
    return jax.tree.map(lambda x: x.replace(index=index) if isinstance(x, LoraBank) else x, params, is_leaf=is_node)

