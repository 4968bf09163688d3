"""`lorax.adapters.weighted`: a new adapter from a weighted combination of others, as PEFT's
``add_weighted_adapter`` makes it (its ``linear``, ``cat`` and ``svd`` types).

With ``ΔW_i = s_i·A_i·B_i`` and weights ``w_i``, the new adapter has scale 1 and

- ``cat``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]``, ``B = [B_1; B_2; ...]`` (ranks add):
  exactly ``Σ w_i ΔW_i``;
- ``svd``: the best rank-``k`` approximation of ``Σ w_i ΔW_i`` (truncated SVD, singular values
  on ``B``'s side), per layer of a stack;
- ``linear`` (equal ranks): ``A = Σ sign(w_i)·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i``. As in
  PEFT, this is a product of sums, so it adds cross terms ``A_i B_j`` to ``Σ w_i ΔW_i``: exact
  for one adapter, an approximation otherwise (PEFT's own docs call it rough).

A source that does not adapt a weight (rank 0 there) is left out for that weight, as PEFT does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src.adapters import _append, _position, _zero, check_name, names
from lorax._src.kinds.bank import LoraBank
from lorax._src.records import index, real
from lorax._src.trees import _map

HOW = ("linear", "cat", "svd")


def weighted(params: Any, name: str, sources: Sequence[str], weights: Sequence[float], *,
             how: Literal["linear", "cat", "svd"] = "svd", rank: int | None = None) -> Any:
    """The bank tree with a new adapter ``name``: the ``weights``-weighted combination of the
    adapters ``sources``, combined ``how`` (see the module docstring; ``rank`` is the SVD's,
    by default the largest source rank). ``weights`` are finite numbers (NumPy scalars too),
    one per source; a negative weight subtracts.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.zeros((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda v: {"w": lorax.LoraWeight(base["w"], jnp.ones((4, 1)), jnp.full((1, 3), v))}
    >>> params = lorax.adapters.bank({"x": one(1.0), "y": one(2.0)})
    >>> mix = lorax.adapters.weighted(params, "mix", ["x", "y"], [0.5, 0.25], how="cat")
    >>> lorax.merge(lorax.adapters.select(mix, "mix"))["w"][0].tolist()  # 0.5·1 + 0.25·2
    [1.0, 1.0, 1.0]
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
    if rank is not None and how != "svd":
        raise ValueError(f"{who}: rank is the SVD's target rank (how='svd'); got rank={rank!r} with how={how!r}.")
    rank = None if rank is None else index(rank, f"{who}: rank", minimum=1)

    def combine(path, x):
        if not isinstance(x, LoraBank):
            return x
        ranks = x.adapter_ranks
        present = [(i, w) for i, w in zip(at, weights) if ranks[i]]
        if not present:
            return _append(x, name, *_zero(x), 0.0, 0)
        if how == "linear" and len({ranks[i] for i, _ in present}) > 1:
            raise ValueError(f"{who}: {path!r}: how='linear' needs sources of one rank; "
                             f"{dict((x.names[i], ranks[i]) for i, _ in present)} differ (use 'cat' or 'svd').")
        a, b = _combined(x, present, how, rank or max(ranks[i] for i in at))
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


def _combined(x: LoraBank, present: list[tuple[int, float]], how: str, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` of the combination, laid out as one `LoraWeight`'s, in float32 then the
    factors' dtype."""
    axis, dtype = x.adapter_axis, x.a.dtype
    parts = []
    for i, w in present:
        a, b, s = x.chosen(jnp.asarray(i))
        r = x.adapter_ranks[i]
        b = jnp.moveaxis(jnp.moveaxis(b, axis, 0)[:r], 0, axis)
        parts.append((a[..., :r].astype(jnp.float32), b.astype(jnp.float32), w * float(s)))
    if how == "cat":
        return (jnp.concatenate([a * ws for a, _, ws in parts], -1).astype(dtype),
                jnp.concatenate([b for _, b, _ in parts], axis).astype(dtype))
    if how == "linear":
        root = [math.sqrt(abs(ws)) for _, _, ws in parts]
        a = sum(math.copysign(r, ws) * a for (a, _, ws), r in zip(parts, root))
        b = sum(r * b for (_, b, _), r in zip(parts, root))
        return jnp.asarray(a).astype(dtype), jnp.asarray(b).astype(dtype)
    stack, a_shape = x.a.shape[:axis], x.a.shape[axis + 1:-1]
    b_shape = x.b.shape[axis + 2:]
    fan_in, fan_out = math.prod(a_shape), math.prod(b_shape)
    delta = sum(ws * jnp.reshape(a, (*stack, fan_in, -1)) @ jnp.reshape(b, (*stack, -1, fan_out))
                for a, b, ws in parts)
    u, sv, vh = jnp.linalg.svd(jnp.asarray(delta), full_matrices=False)
    keep = min(rank, sv.shape[-1])
    pad = rank - keep  # a rank above min(in, out): zero columns, as PEFT's zero-initialised factors
    a = jnp.pad(u[..., :keep], [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    b = jnp.pad(sv[..., :keep, None] * vh[..., :keep, :], [(0, 0)] * (vh.ndim - 2) + [(0, pad), (0, 0)])
    return (a.reshape(*stack, *a_shape, rank).astype(dtype), b.reshape(*stack, rank, *b_shape).astype(dtype))
