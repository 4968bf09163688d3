"""Factored rules: how a primitive that consumes a LoRA weight runs without W + s·A·B.

Each rule takes the equation, its inputs (some of them `Tracked`) and the recorder, and
returns the outputs or ``None`` when it cannot factor this use (the interpreter then
materializes the weight for this use only and records why).
"""

from __future__ import annotations

import string
from typing import Callable

import jax.numpy as jnp
from jax import lax

from lorax._src import compat
from lorax._src.lowrank import low_rank_update
from lorax._src.tracked import Tracked

Rule = Callable[..., "list | None"]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    def add(rule: Rule) -> Rule:
        for name in names:
            RULES[name] = rule
        return rule

    return add


def _remap(axes: tuple[int, ...], new_position: dict[int, int]) -> tuple[int, ...]:
    return tuple(new_position[i] for i in axes)


def _relayout(t: Tracked, new_position: dict[int, int], w) -> Tracked:
    lw = t.weight
    return t.with_weight(
        w=w,
        a_axes=_remap(lw.a_axes, new_position),
        b_axes=_remap(lw.b_axes, new_position),
        stack_axes=_remap(lw.stack_axes, new_position),
    )


# ----------------------------------------------------------------------------- views of W


@register_rule("transpose")
def _transpose(eqn, invals, rec):
    (t,) = invals
    perm = eqn.params["permutation"]
    w = compat.bind(eqn, [t.weight.w])[0]
    return [_relayout(t, {old: new for new, old in enumerate(perm)}, w)]


@register_rule("convert_element_type")
def _convert(eqn, invals, rec):
    (t,) = invals
    dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    w = compat.bind(eqn, [t.weight.w])[0]
    a, b = t.factors(dtype)
    return [t.with_weight(w=w, a=a, b=b)]


@register_rule("copy", "copy_p", "sharding_constraint", "reduce_precision")
def _same_layout(eqn, invals, rec):
    (t,) = invals
    return [t.with_weight(w=compat.bind(eqn, [t.weight.w])[0])]


@register_rule("squeeze")
def _squeeze(eqn, invals, rec):
    """Indexing one layer of a stack (``w[i]`` with a static ``i``) ends in a squeeze."""
    (t,) = invals
    dims = set(eqn.params["dimensions"])
    lw = t.weight
    if not dims <= set(lw.stack_axes):
        return None
    keep = [i for i in range(lw.w.ndim) if i not in dims]
    stack_pos = [k for k, s in enumerate(lw.stack_axes) if s in dims]
    a = jnp.squeeze(lw.a, tuple(stack_pos))
    b = jnp.squeeze(lw.b, tuple(stack_pos))
    new_position = {old: new for new, old in enumerate(keep)}
    w = compat.bind(eqn, [lw.w])[0]
    return [
        t.with_weight(
            w=w, a=a, b=b,
            a_axes=_remap(lw.a_axes, new_position),
            b_axes=_remap(lw.b_axes, new_position),
            stack_axes=tuple(new_position[s] for s in lw.stack_axes if s not in dims),
        )
    ]


@register_rule("slice")
def _slice(eqn, invals, rec):
    (t,) = invals
    lw = t.weight
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * lw.w.ndim
    sliced = [i for i in range(lw.w.ndim) if (start[i], limit[i], strides[i]) != (0, lw.w.shape[i], 1)]
    if not set(sliced) <= set(lw.stack_axes):
        return None
    w = compat.bind(eqn, [lw.w])[0]

    def take(x, axes):
        index = [slice(None)] * x.ndim
        for k, axis in enumerate(axes):
            index[k] = slice(start[axis], limit[axis], strides[axis])
        return x[tuple(index)]

    return [t.with_weight(w=w, a=take(lw.a, lw.stack_axes), b=take(lw.b, lw.stack_axes))]


@register_rule("dynamic_slice")
def _dynamic_slice(eqn, invals, rec):
    """``w[i]`` with a traced ``i`` on a stacked weight: dynamic_slice then squeeze."""
    t, *starts = invals
    if any(isinstance(s, Tracked) for s in starts):
        return None
    lw = t.weight
    sizes = eqn.params["slice_sizes"]
    sliced = [i for i in range(lw.w.ndim) if sizes[i] != lw.w.shape[i]]
    if not set(sliced) <= set(lw.stack_axes):
        return None
    w = compat.bind(eqn, [lw.w, *starts])[0]

    def take(x):
        k = len(lw.stack_axes)
        x_starts = [starts[s] for s in lw.stack_axes] + [0] * (x.ndim - k)
        x_sizes = [sizes[s] for s in lw.stack_axes] + list(x.shape[k:])
        return lax.dynamic_slice(x, x_starts, x_sizes)

    return [t.with_weight(w=w, a=take(lw.a), b=take(lw.b))]


# ------------------------------------------------------------------------ factored uses


def _letters():
    return iter(string.ascii_letters)


@register_rule("dot_general")
def _dot_general(eqn, invals, rec):
    lhs, rhs = invals
    if isinstance(lhs, Tracked) and isinstance(rhs, Tracked):
        return None
    weight_is_lhs = isinstance(lhs, Tracked)
    t, x = (lhs, rhs) if weight_is_lhs else (rhs, lhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    base = compat.bind(eqn, [t.weight.w, x] if weight_is_lhs else [x, t.weight.w])[0]

    w_nd, x_nd = t.weight.w.ndim, jnp.ndim(x)
    letters = _letters()
    lhs_sub = [next(letters) for _ in range(w_nd if weight_is_lhs else x_nd)]
    rhs_sub: list = [None] * (x_nd if weight_is_lhs else w_nd)
    for l_axis, r_axis in zip((*lc, *lb), (*rc, *rb)):
        rhs_sub[r_axis] = lhs_sub[l_axis]
    rhs_sub = [c or next(letters) for c in rhs_sub]
    out_sub = [lhs_sub[i] for i in lb]
    out_sub += [c for i, c in enumerate(lhs_sub) if i not in (*lc, *lb)]
    out_sub += [c for i, c in enumerate(rhs_sub) if i not in (*rc, *rb)]
    w_sub, x_sub = (lhs_sub, rhs_sub) if weight_is_lhs else (rhs_sub, lhs_sub)

    lw = t.weight
    rank = next(letters)
    stack = [w_sub[i] for i in lw.stack_axes]
    a_sub = "".join(stack + [w_sub[i] for i in lw.a_axes] + [rank])
    b_sub = "".join(stack + [rank] + [w_sub[i] for i in lw.b_axes])
    a, b = t.factors(lw.w.dtype)
    out = "".join(out_sub)
    contracted = lambda axes: all(w_sub[i] not in out for i in axes)  # noqa: E731
    order = [(a_sub, a), (b_sub, b)]
    if not contracted(lw.a_axes) and contracted(lw.b_axes):
        order.reverse()  # a tied head x·Eᵀ contracts b's axes: go through b first
    (f1_sub, f1), (f2_sub, f2) = order
    kw = dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))
    update = low_rank_update("".join(x_sub), t.adapter_input(x, rec.next_use()), f1_sub, f1,
                             f2_sub, f2, out, lw.scale, rec.views, **kw)
    return [base + update.astype(base.dtype)]


def _as_kernel(t: Tracked, width_axis: int):
    """Lay ``a`` out like ``w`` with ``width_axis`` holding the rank (a conv or table)."""
    lw = t.weight
    a_sub, _, w_sub = lw.subscripts()
    rank = a_sub[-1]
    target = "".join(rank if i == width_axis else w_sub[i] for i in range(lw.w.ndim))
    a, _ = t.factors(lw.w.dtype)
    return jnp.einsum(f"{a_sub}->{target}", a)


def _apply_b(y, axis: int, b, scale):
    """Contract ``y``'s rank axis ``axis`` with ``b`` [r, out], putting out in its place."""
    y = jnp.moveaxis(y * scale, axis, -1)
    return jnp.moveaxis(jnp.tensordot(y, b.astype(y.dtype), axes=1), -1, axis)


@register_rule("conv_general_dilated")
def _conv(eqn, invals, rec):
    x, t = invals
    if isinstance(x, Tracked) or not isinstance(t, Tracked):
        return None
    p, lw = eqn.params, t.weight
    _, rhs_spec, out_spec = p["dimension_numbers"]
    out_axis = rhs_spec[0]
    if (p["feature_group_count"], p["batch_group_count"]) != (1, 1) or lw.stack_axes or \
            lw.b_axes != (out_axis,):
        return None
    base = compat.bind(eqn, [x, t.weight.w])[0]
    kernel = _as_kernel(t, out_axis)
    y = compat.bind(eqn, [t.adapter_input(x, rec.next_use()), kernel])[0]
    _, b = t.factors(lw.w.dtype)
    return [base + _apply_b(y, out_spec[1], b, lw.scale).astype(base.dtype)]


@register_rule("gather")
def _gather(eqn, invals, rec):
    t, indices = invals
    if not isinstance(t, Tracked) or isinstance(indices, Tracked):
        return None
    p, lw = eqn.params, t.weight
    dn = p["dimension_numbers"]
    (j,) = lw.b_axes if len(lw.b_axes) == 1 else (None,)
    if j is None or lw.stack_axes or j in dn.collapsed_slice_dims or j in dn.start_index_map \
            or j in dn.operand_batching_dims or p["slice_sizes"][j] != lw.w.shape[j]:
        return None
    base = compat.bind(eqn, [t.weight.w, indices])[0]
    table = _as_kernel(t, j)
    sizes = list(p["slice_sizes"])
    sizes[j] = lw.rank
    y = compat.bind(eqn, [table, indices], slice_sizes=tuple(sizes))[0]
    kept = [i for i in range(lw.w.ndim) if i not in (*dn.collapsed_slice_dims, *dn.operand_batching_dims)]
    _, b = t.factors(lw.w.dtype)
    return [base + _apply_b(y, dn.offset_dims[kept.index(j)], b, lw.scale).astype(base.dtype)]
