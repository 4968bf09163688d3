"""View rules: transposes, casts, copies and slices of a stack keep the adapter lazy.

``read`` maps the parameter axes through the view; ``apply`` applies the view to the base
``w`` and re-describes the trained arrays through the adapter contract (`Adapter.relayout`,
`Adapter.take_stack`). Any adapter kind gets them for free. A base that is not a plain array
views itself where it can (``view_base``: a `QuantizedArray` transposes, casts and slices its
codes while its blocks stay whole); otherwise the view applies to the dense weight.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lorax._src import compat
from lorax._src.bases.bits import NARROW, Bf16Bits
from lorax._src.bases.quantized import QuantizedArray, dense
from lorax._src.kinds.adapter import Adapter
from lorax._src.tracing.table import RULES, apply, rule, view_base
from lorax._src.tracing.tracked import is_tracked
from lorax._src.tracing.uses import View

_SAME_LAYOUT = ("copy", "copy_p", "sharding_constraint", "reduce_precision")


def _base(eqn, t, *rest):
    """The view of the base: its type's own (`view_base`) where it has one, else the dense weight's."""
    w = t.weight.w
    own = RULES[eqn.primitive.name].base_handler(type(w))
    viewed = None if own is None else own(eqn, w, list(rest))
    return compat.bind(eqn, [dense(w), *rest])[0] if viewed is None else viewed


@rule("transpose", kind="view")
def _read_transpose(eqn, vs, walk):
    v = vs[0]
    return [View(v.leaf, tuple(v.axes[k] for k in eqn.params["permutation"]), v.stacked)], []


@apply("transpose", adapter=Adapter)
def _transpose(eqn, invals, ctx):
    (t,) = invals
    perm = eqn.params["permutation"]
    return [t.with_weight(t.weight.relayout({old: new for new, old in enumerate(perm)}, w=_base(eqn, t)))]


def _inexact(eqn) -> bool:
    return bool(jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact))


@rule("convert_element_type", kind="view")
def _read_convert(eqn, vs, walk):
    return [vs[0] if _inexact(eqn) else None], []


@apply("convert_element_type", adapter=Adapter)
def _convert(eqn, invals, ctx):
    (t,) = invals
    if not _inexact(eqn):
        return None
    return [t.with_weight(t.weight.replace(w=_base(eqn, t), **t.weight.cast(eqn.params["new_dtype"])))]


@rule(*_SAME_LAYOUT, kind="view")
def _read_same(eqn, vs, walk):
    return [vs[0]], []


@apply(*_SAME_LAYOUT, adapter=Adapter)
def _same_layout(eqn, invals, ctx):
    (t,) = invals
    return [t.with_weight(t.weight.replace(w=_base(eqn, t)))]


@rule("squeeze", kind="view")
def _read_squeeze(eqn, vs, walk):
    """Squeezing one layer out of a stack makes that axis a stack axis."""
    v, dims = vs[0], eqn.params["dimensions"]
    return [View(v.leaf, tuple(a for k, a in enumerate(v.axes) if k not in dims),
                 (*v.stacked, *(v.axes[k] for k in dims)))], []


@apply("squeeze", adapter=Adapter)
def _squeeze(eqn, invals, ctx):
    """Indexing one layer of a stack (``w[i]`` with a static ``i``) ends in a squeeze."""
    (t,) = invals
    lw = t.weight
    dims = set(eqn.params["dimensions"])
    if not dims <= set(lw.stack_axes):
        return None
    keep = [i for i in range(len(lw.shape)) if i not in dims]
    squeezed = lw.take_stack(lambda axis: 0 if axis in dims else slice(None))
    return [t.with_weight(squeezed.relayout({old: new for new, old in enumerate(keep)}, w=_base(eqn, t)))]


@rule("slice", "dynamic_slice", kind="view")
def _read_slice(eqn, vs, walk):
    """A slice keeps every axis (slicing layers of a stack keeps it a stack)."""
    return [vs[0]], []


def _sliced_axes_are_stacked(lw: Adapter, sliced: list[int]) -> bool:
    return set(sliced) <= set(lw.stack_axes)


@apply("slice", adapter=Adapter)
def _slice(eqn, invals, ctx):
    (t,) = invals
    lw = t.weight
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(lw.shape)
    sliced = [i for i in range(len(lw.shape)) if (start[i], limit[i], strides[i]) != (0, lw.shape[i], 1)]
    if not _sliced_axes_are_stacked(lw, sliced):
        return None
    return [t.with_weight(lw.take_stack(lambda axis: slice(start[axis], limit[axis], strides[axis]),
                                        w=_base(eqn, t)))]


@apply("dynamic_slice", adapter=Adapter)
def _dynamic_slice(eqn, invals, ctx):
    """``w[i]`` with a traced ``i`` on a stacked weight: dynamic_slice then squeeze."""
    t, *starts = invals
    if any(is_tracked(s) for s in starts):
        return None
    lw = t.weight
    sizes = eqn.params["slice_sizes"]
    if not _sliced_axes_are_stacked(lw, [i for i in range(len(lw.shape)) if sizes[i] != lw.shape[i]]):
        return None

    def take(name, x, entries):
        x_starts = [starts[e] if e in lw.stack_axes else 0 for e in entries]
        x_sizes = [sizes[e] if e in lw.stack_axes else n for e, n in zip(entries, x.shape)]
        return lax.dynamic_slice(x, x_starts, x_sizes)

    return [t.with_weight(lw.map_trained(take, w=_base(eqn, t, *starts)))]


@view_base("transpose", base=QuantizedArray)
def _transpose_codes(eqn, w, rest):
    return w.transpose(eqn.params["permutation"])


@view_base("convert_element_type", base=QuantizedArray)
def _cast_codes(eqn, w, rest):
    return w.astype(eqn.params["new_dtype"]) if _inexact(eqn) else None


@view_base("copy", "copy_p", "sharding_constraint", base=QuantizedArray)  # not reduce_precision: it rounds values
def _same_codes(eqn, w, rest):
    return None if rest else w


@view_base("squeeze", base=QuantizedArray)
def _squeeze_codes(eqn, w, rest):
    axis, dims = w.axis % w.ndim, eqn.params["dimensions"]
    if axis in dims:
        return None
    moved = axis - sum(d < axis for d in dims) - (w.ndim - len(dims))
    return w.map_arrays(lambda x: compat.bind(eqn, [x])[0], moved)


@view_base("slice", base=QuantizedArray)
def _slice_codes(eqn, w, rest):
    """Slices that keep the blocked axis whole slice the codes and scales alike."""
    axis, p = w.axis % w.ndim, eqn.params
    if (p["start_indices"][axis], p["limit_indices"][axis]) != (0, w.shape[axis]) or \
            (p["strides"] is not None and p["strides"][axis] != 1):
        return None
    return w.map_arrays(lambda x: compat.bind(eqn, [x], limit_indices=_at(p["limit_indices"], axis, x.shape[axis]))[0])


@view_base("dynamic_slice", base=QuantizedArray)
def _dynamic_slice_codes(eqn, w, rest):
    axis, sizes = w.axis % w.ndim, eqn.params["slice_sizes"]
    if sizes[axis] != w.shape[axis]:
        return None
    return w.map_arrays(lambda x: compat.bind(eqn, [x, *rest], slice_sizes=_at(sizes, axis, x.shape[axis]))[0])


def _at(values, index: int, value) -> tuple:
    """``values`` with entry ``index`` set to ``value`` (a slice's size along the blocked axis, in codes)."""
    values = list(values)
    values[index] = value
    return tuple(values)


@view_base("transpose", "squeeze", "slice", "dynamic_slice", "copy", "copy_p", "sharding_constraint", base=Bf16Bits)
def _view_bits(eqn, w, rest):
    """A layout view of a bf16 weight carried as bits is the same view of its bits."""
    return w.view(eqn, rest)


@view_base("convert_element_type", base=Bf16Bits)
def _cast_bits(eqn, w, rest):
    """A cast to bf16 leaves the bits as they are; any other cast applies to the values."""
    return w if eqn.params["new_dtype"] == NARROW else None
