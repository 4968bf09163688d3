"""`lorax.adapters.weighted`: a new adapter from a weighted combination of others, as PEFT's
``add_weighted_adapter`` makes it (every combination type of its LoRA adapters).

With ``ΔW_i = s_i·A_i·B_i`` and weights ``w_i``, the new adapter has scale 1 and

- ``cat``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]``, ``B = [B_1; B_2; ...]`` (ranks add):
  exactly ``Σ w_i ΔW_i``;
- ``svd``: the best rank-``k`` approximation of ``Σ w_i ΔW_i`` (truncated SVD, singular values
  on ``B``'s side), per layer of a stack;
- ``linear`` (equal ranks): ``A = Σ sign(w_i)·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i``. As in
  PEFT, this is a product of sums, so it adds cross terms ``A_i B_j`` to ``Σ w_i ΔW_i``: exact
  for one adapter, an approximation otherwise (PEFT's own docs call it rough).

Model-merging methods, as PEFT runs them (``peft.utils.merge_utils``), per layer of a stack:

- ``magnitude_prune``: each tensor keeps its ``density`` fraction of largest magnitudes, then
  the weighted sum;
- ``ties`` (Yadav et al. 2023): magnitude pruning, a sign elected per entry (``"total"``: the
  sign of the sum; ``"frequency"``: the more common sign), then the weighted entries that agree
  with it averaged;
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): each entry kept with probability ``density``
  (drawn from ``key``) and rescaled by ``1/density``, then summed, or elected and averaged as ties.

As named they act on the factors, as ``linear`` does (equal ranks; ``A`` and ``B`` each merged
with the square-root weights); as ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` and
``magnitude_prune_svd`` they act on the updates ``w_i·ΔW_i``, and the result is truncated to
rank ``rank`` as ``svd`` is.

A source that does not adapt a weight (rank 0 there) is left out for that weight, as PEFT does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src.banks.verbs import _append, _position, _zero, check_name, names
from lorax._src.kinds.bank import LoraBank
from lorax._src.trees import _map
from lorax._src.validate import index, real

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on the factors; "_svd": on ΔW
HOW = ("cat", *MERGES, "svd", *(f"{m}_svd" for m in MERGES[1:]))


def weighted(params: Any, name: str, sources: Sequence[str], weights: Sequence[float], *,
             how: str = "svd", rank: int | None = None, density: float | None = None,
             majority_sign_method: Literal["total", "frequency"] = "total", key: jax.Array | None = None) -> Any:
    """The bank tree with a new adapter ``name``: the ``weights``-weighted combination of the
    adapters ``sources``, combined ``how`` (see the module docstring; ``rank`` is the SVD's,
    by default the largest source rank). ``weights`` are finite numbers (NumPy scalars too),
    one per source; a negative weight subtracts. The model-merging types (``ties``,
    ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their SVD forms) take
    ``density``, the fraction kept (in (0, 1]); the ties types ``majority_sign_method``; the
    DARE types a PRNG ``key`` for their random drop.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.zeros((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda v: {"w": lorax.LoraWeight(base["w"], jnp.ones((4, 1)), jnp.full((1, 3), v))}
    >>> params = lorax.adapters.bank({"x": one(1.0), "y": one(2.0)})
    >>> mix = lorax.adapters.weighted(params, "mix", ["x", "y"], [0.5, 0.25], how="cat")
    >>> lorax.merge(lorax.adapters.select(mix, "mix"))["w"][0].tolist()  # 0.5·1 + 0.25·2
    [1.0, 1.0, 1.0]
    >>> ties = lorax.adapters.weighted(params, "ties", ["x", "y"], [1.0, 1.0], how="ties_svd", density=0.5)
    >>> w = lorax.merge(lorax.adapters.select(ties, "ties"))["w"]  # the first 6 of 12 equal entries kept
    >>> jnp.round(w, 4)[:, 0].tolist()                            # of each ΔW, signs agree: averaged
    [1.5, 1.5, 0.0, 0.0]
    """
    who = "lorax.adapters.weighted"
    check_name(name, who)
    if not isinstance(how, str) or how not in HOW:
        raise ValueError(f"{who}: how must be one of {HOW}, got {how!r}.")
    at = [_position(params, n, who) for n in _listed(sources, "sources", who)]
    weights = [real(w, f"{who}: weights[{i}]") for i, w in enumerate(_listed(weights, "weights", who))]
    if not at or len(set(at)) != len(at) or len(weights) != len(at):
        raise ValueError(f"{who}: give distinct source names and one weight each; got {list(sources)} and "
                         f"{weights}.")
    if name in names(params):
        raise ValueError(f"{who}: the bank already holds an adapter {name!r}.")
    if rank is not None and not how.endswith("svd"):
        raise ValueError(f"{who}: rank is the SVD's target rank (how='svd' or '*_svd'); got rank={rank!r} with "
                         f"how={how!r}.")
    rank = None if rank is None else index(rank, f"{who}: rank", minimum=1)
    merge = _merge_settings(how, density, majority_sign_method, key, who)

    count = itertools.count()  # each weight its own DARE keys

    def combine(path, x):
        if not isinstance(x, LoraBank):
            return x
        ranks = x.adapter_ranks
        present = [(i, w) for i, w in zip(at, weights) if ranks[i]]
        if not present:
            return _append(x, name, *_zero(x), 0.0, 0)
        if how in MERGES and len({ranks[i] for i, _ in present}) > 1:
            raise ValueError(f"{who}: {path!r}: how={how!r} needs sources of one rank; "
                             f"{dict((x.names[i], ranks[i]) for i, _ in present)} differ (use 'cat' or 'svd').")
        keys = None if merge.key is None else jax.random.split(jax.random.fold_in(merge.key, next(count)), len(at))
        a, b = _combined(x, present, how, rank or max(ranks[i] for i in at),
                         merge._replace(key=None if keys is None else [keys[at.index(i)] for i, _ in present]))
        return _append(x, name, jnp.expand_dims(a, x.adapter_axis), jnp.expand_dims(b, x.adapter_axis),
                       1.0, a.shape[-1])

    return _map(combine, params)


def _listed(values: Any, what: str, who: str) -> list:
    """``values`` (a list, tuple or 1-d NumPy array) as a list; a string or anything else is refused."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return list(values)
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{who}: {what} must be a list (one entry per source), got {values!r} "
                        f"({type(values).__name__}).")
    return list(values)


class Merge(NamedTuple):
    """A model-merging type's settings, checked: what `merged` needs besides the tensors."""

    method: str  # one of MERGES
    density: float
    sign: str
    key: Any  # a PRNG key, or (in `_combined`) one key per present source, or None


def _merge_settings(how: str, density: Any, sign: Any, key: Any, who: str) -> Merge:
    method = how.removesuffix("_svd") if how != "svd" else "linear"
    pruned, dare = method in ("ties", "magnitude_prune", "dare_linear", "dare_ties"), method.startswith("dare")
    if not pruned:
        if density is not None or key is not None:
            raise ValueError(f"{who}: density and key are for the model-merging types (ties, dare_*, "
                             f"magnitude_prune); got density={density!r}, key={key!r} with how={how!r}.")
        return Merge(method, 1.0, "total", None)
    if density is None:
        raise ValueError(f"{who}: how={how!r} needs density, the fraction of each tensor kept, in (0, 1].")
    density = real(density, f"{who}: density")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{who}: density must be in (0, 1], got {density!r}.")
    if sign not in ("total", "frequency"):
        raise ValueError(f"{who}: majority_sign_method must be 'total' or 'frequency', got {sign!r}.")
    if dare != (key is not None):
        raise ValueError(f"{who}: how={how!r} " + ("draws its drop from key: pass key=jax.random.key(...)." if dare
                                                   else f"is deterministic; key is for the dare types, got {key!r}."))
    if dare and not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
        raise TypeError(f"{who}: key must be one new-style PRNG key (jax.random.key), got {key!r:.80}.")
    return Merge(method, density, sign, key)


def merged(tensors: list[jax.Array], weights: list[float], merge: Merge, stack: int = 0) -> jax.Array:
    """The ``weights``-weighted merge of ``tensors`` (one shape) by ``merge.method``, as PEFT's
    ``merge_utils``: pruning, sign election and averaging per layer (the first ``stack`` axes).

    >>> import jax.numpy as jnp
    >>> t = [jnp.array([3.0, -1.0, 0.5]), jnp.array([-2.0, -1.0, 4.0])]
    >>> merged(t, [1.0, 1.0], Merge("ties", 2 / 3, "total", None)).tolist()  # top 2 of 3 kept, signs elected
    [3.0, -1.0, 4.0]
    """
    t = jnp.stack(tensors)
    flat = t.reshape(len(tensors), math.prod(t.shape[1:stack + 1]), -1)
    if merge.method in ("ties", "magnitude_prune") and merge.density < 1:
        k = int(merge.density * flat.shape[-1])
        threshold = jax.lax.top_k(jnp.abs(flat), k)[0][..., -1:] if k else jnp.inf
        keep = jnp.abs(flat) >= threshold
        if k:  # equal magnitudes at the threshold: keep the first k, as a top-k does
            keep = keep & (jnp.cumsum(keep, axis=-1) <= k)
        flat = jnp.where(keep, flat, 0)
    if merge.method.startswith("dare") and merge.density < 1:
        keep = jnp.stack([jax.random.bernoulli(k, merge.density, flat.shape[1:]) for k in merge.key])
        flat = jnp.where(keep, flat / merge.density, 0)
    w = jnp.asarray(weights, flat.dtype)[:, None, None]
    if merge.method in ("ties", "dare_ties"):
        sign = jnp.sign(flat)
        total = flat.sum(0) if merge.sign == "total" else sign.sum(0)
        agree = sign == jnp.where(total >= 0, 1, -1)
        out = (flat * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1)
    else:
        out = (flat * w).sum(0)
    return out.reshape(t.shape[1:])


def _combined(x: LoraBank, present: list[tuple[int, float]], how: str, rank: int,
              merge: Merge) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` of the combination, laid out as one `LoraWeight`'s, in float32 then the
    factors' dtype."""
    axis, dtype = x.adapter_axis, x.a.dtype
    parts = []  # (a, b, weight, scale) per source
    for i, w in present:
        a, b, s = x.chosen(jnp.asarray(i))
        r = x.adapter_ranks[i]
        b = jnp.moveaxis(jnp.moveaxis(b, axis, 0)[:r], 0, axis)
        parts.append((a[..., :r].astype(jnp.float32), b.astype(jnp.float32), w, float(s)))
    if how == "cat":
        return (jnp.concatenate([a * w * s for a, _, w, s in parts], -1).astype(dtype),
                jnp.concatenate([b for _, b, _, _ in parts], axis).astype(dtype))
    if how in MERGES:  # A and B each merged, with sign(w s)·√|w s| on A's side and √|w s| on B's
        root = [math.sqrt(abs(w * s)) for _, _, w, s in parts]
        keys = (None, None) if merge.key is None else tuple([jax.random.fold_in(k, side) for k in merge.key]
                                                            for side in (0, 1))
        a = merged([a for a, _, _, _ in parts], [math.copysign(r, w * s) for (_, _, w, s), r in zip(parts, root)],
                   merge._replace(key=keys[0]), axis)
        b = merged([b for _, b, _, _ in parts], root, merge._replace(key=keys[1]), axis)
        return a.astype(dtype), b.astype(dtype)
    stack, a_shape = x.a.shape[:axis], x.a.shape[axis + 1:-1]
    b_shape = x.b.shape[axis + 2:]
    fan_in, fan_out = math.prod(a_shape), math.prod(b_shape)
    deltas = [s * jnp.reshape(a, (*stack, fan_in, -1)) @ jnp.reshape(b, (*stack, -1, fan_out)) for a, b, _, s in parts]
    delta = merged(deltas, [w for _, _, w, _ in parts], merge, axis)
    u, sv, vh = jnp.linalg.svd(jnp.asarray(delta), full_matrices=False)
    keep = min(rank, sv.shape[-1])
    pad = rank - keep  # a rank above min(in, out): zero columns, as PEFT's zero-initialised factors
    a = jnp.pad(u[..., :keep], [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    b = jnp.pad(sv[..., :keep, None] * vh[..., :keep, :], [(0, 0)] * (vh.ndim - 2) + [(0, pad), (0, 0)])
    return (a.reshape(*stack, *a_shape, rank).astype(dtype), b.reshape(*stack, rank, *b_shape).astype(dtype))
