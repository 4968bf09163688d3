"""Product rules: the uses that consume a weight (dot, convolution, lookup).

Here is the ``read`` side (which axes a product contracts, outputs and batches) and the
pieces every adapter kind computes its product from: the frozen product, delegated to the
base (`base_product`), and the parts of the low-rank term. Each kind registers its
``apply`` in its own module (`lorax._src.kinds`).
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp

from lorax._src import compat
from lorax._src.bases import precision
from lorax._src.bases.quantized import stored
from lorax._src.kinds.lowrank import low_rank_update
from lorax._src.tracing.table import rule
from lorax._src.tracing.tracked import is_tracked
from lorax._src.tracing.uses import use_of


def base_product(eqn, operands: list, position: int, narrow: precision.Narrowing | None = None) -> jax.Array:
    """The frozen product, with the base weight at ``operands[position]``. A base that is
    not a plain array (a quantized one, bf16 bits) computes it itself through ``lorax_product``,
    given how to evaluate the product; with ``narrow``, a low-precision product accumulated wide
    has its backward in the operands' precision (`lorax._src.bases.precision`), a bf16 weight
    carried through a scan as its bits (`lorax._src.bases.bits`) and a quantized weight
    dequantized to bf16 included, and the other operand, where it is a bf16 cast of a wider
    array, gets its gradient in that array's dtype."""
    if narrow is None or eqn.primitive.name != "dot_general" or not precision.widens(eqn):
        own = getattr(operands[position], "lorax_product", None)
        return own(eqn, operands, position) if own else compat.bind(eqn, operands)[0]
    operands = [v if i == position else narrow.source(v) for i, v in enumerate(operands)]
    own = getattr(operands[position], "lorax_product", None)
    return own(eqn, operands, position, bind=_narrow_product) if own else _narrow_product(eqn, operands)


def _narrow_product(eqn, operands: list) -> jax.Array:
    """The dot_general ``eqn`` of two bf16 operands (or a wider array the model cast to bf16, in
    its place) through `precision.narrow_dot`; a weight carried as bits goes in as its bits."""
    lhs, rhs = (stored(v) for v in operands)
    lhs_sub, rhs_sub, out_sub = dot_subscripts(eqn.params["dimension_numbers"], jnp.ndim(lhs), jnp.ndim(rhs))
    return precision.narrow_dot(lhs, rhs, ("".join(lhs_sub), "".join(rhs_sub), "".join(out_sub)),
                                eqn.params["precision"], eqn.params["preferred_element_type"])


# ----------------------------------------------------------------------------- dot_general


@rule("dot_general", kind="product")
def _read_dot(eqn, vs, walk):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    found = [use_of(v, "dot_general", c, b) for v, c, b in ((vs[0], lc, lb), (vs[1], rc, rb)) if v is not None]
    return [None], found


@dataclasses.dataclass(frozen=True)
class DotParts:
    """A dot_general with an adapted weight, taken apart: the frozen product ``base``, the
    low-rank term ``update`` (scaled, in the product's dtype), the letters of W's axes
    (``w_sub``) and of the output (``out``); `dot_parts` makes it.

    >>> import dataclasses
    >>> from lorax.extend import DotParts
    >>> [f.name for f in dataclasses.fields(DotParts)]
    ['base', 'update', 'w_sub', 'out']
    """

    base: jax.Array
    update: jax.Array
    w_sub: list[str]
    out: str


@dataclasses.dataclass(frozen=True)
class DotLetters:
    """A dot_general with an adapted weight, lettered as an einsum: the adapted operand
    ``t`` and the other one ``x``, the letters of W's axes (``w_sub``), of ``x``, of the
    output, and ``unused``, two letters neither operand uses."""

    t: Any
    x: jax.Array
    weight_is_lhs: bool
    w_sub: list[str]
    x_sub: str
    out: str
    unused: str

    @property
    def factors(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """The letters and fields of a `LowRank` node's two factors in the order they meet
        ``x``: ``(first_sub, first_field), (second_sub, second_field)`` (``a`` first, or ``b``
        first for a tied head ``x·Eᵀ``), read from the kind's layout for one entry of its
        factor axes (a bank's adapter)."""
        lw = self.t.weight
        rank, entry = self.unused
        subs = lw.subscripts("".join(self.w_sub) + rank + entry)
        a_sub, b_sub = (subs[name].replace(entry, "") for name in ("a", "b"))
        contracted = lambda axes: all(self.w_sub[i] not in self.out for i in axes)  # noqa: E731
        if not contracted(lw.a_axes) and contracted(lw.b_axes):
            return (b_sub, "b"), (a_sub, "a")  # a tied head x·Eᵀ contracts b's axes: go through b first
        return (a_sub, "a"), (b_sub, "b")

    def base(self, eqn, w, narrow: precision.Narrowing | None) -> jax.Array:
        """The frozen product with ``w`` in the weight's place (``narrow``: see `base_product`)."""
        return base_product(eqn, [w, self.x] if self.weight_is_lhs else [self.x, w], 0 if self.weight_is_lhs else 1,
                            narrow)


def dot_subscripts(dimension_numbers, lhs_nd: int, rhs_nd: int) -> tuple[list[str], list[str], list[str]]:
    """A dot_general's operands and output lettered as an einsum: ``(lhs, rhs, out)``; the
    letters are the first ``lhs_nd + rhs_nd`` of ``string.ascii_letters`` at most."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter(string.ascii_letters)
    lhs = [next(letters) for _ in range(lhs_nd)]
    rhs: list = [None] * rhs_nd
    for l_axis, r_axis in zip((*lc, *lb), (*rc, *rb)):
        rhs[r_axis] = lhs[l_axis]
    rhs = [c or next(letters) for c in rhs]
    out = [lhs[i] for i in lb]
    out += [c for i, c in enumerate(lhs) if i not in (*lc, *lb)]
    out += [c for i, c in enumerate(rhs) if i not in (*rc, *rb)]
    return lhs, rhs, out


def dot_letters(eqn, invals) -> DotLetters | None:
    """`DotLetters` of a dot_general with one adapted operand; None when both are adapted."""
    lhs, rhs = invals
    weight_is_lhs = is_tracked(lhs)
    if weight_is_lhs and is_tracked(rhs):
        return None
    t, x = (lhs, rhs) if weight_is_lhs else (rhs, lhs)
    lw = t.weight
    w_nd, x_nd = len(lw.shape), jnp.ndim(x)
    lhs_sub, rhs_sub, out_sub = dot_subscripts(eqn.params["dimension_numbers"],
                                               *((w_nd, x_nd) if weight_is_lhs else (x_nd, w_nd)))
    w_sub, x_sub = (lhs_sub, rhs_sub) if weight_is_lhs else (rhs_sub, lhs_sub)

    unused = string.ascii_letters[w_nd + x_nd:w_nd + x_nd + 2]
    return DotLetters(t, x, weight_is_lhs, w_sub, "".join(x_sub), "".join(out_sub), unused)


def dot_parts(eqn, invals, ctx) -> DotParts | None:
    """`DotParts` for the low-rank factors ``a``/``b`` of the adapted operand, or None when
    both operands are adapted: what a kind built on LoRA's factors combines in its
    ``dot_general`` rule.

    >>> import dataclasses, jax.numpy as jnp, lorax
    >>> from lorax import extend
    >>> @extend.register_kind
    ... @dataclasses.dataclass(frozen=True, repr=False)
    ... class Doubled(lorax.LoraWeight):            # LoRA whose update counts twice
    ...     kind = "doubled-example"
    ...     def merged(self):
    ...         return self.w + 2 * self.scale * self.a @ self.b
    >>> @extend.apply("dot_general", adapter=Doubled)
    ... def doubled_dot(eqn, invals, ctx):
    ...     parts = extend.dot_parts(eqn, invals, ctx)
    ...     return None if parts is None else [parts.base + 2 * parts.update]
    >>> p = {"w": Doubled(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)}
    >>> lorax.lora(lambda p, x: x @ p["w"])(p, jnp.ones((1, 4))).tolist()   # 4 + 2·0.5·8
    [[12.0, 12.0, 12.0]]
    >>> del extend.KINDS["doubled-example"], extend.RULES["dot_general"].apply[Doubled]
    """
    d = dot_letters(eqn, invals)
    if d is None:
        return None
    lw = d.t.weight
    base = d.base(eqn, lw.w, ctx.narrow)
    (f1_sub, f1), (f2_sub, f2) = ((sub, getattr(lw, name).astype(lw.w.dtype)) for sub, name in d.factors)
    kw = dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))
    update = low_rank_update(d.x_sub, d.t.adapter_input(d.x, ctx.next_use()), f1_sub, f1,
                             f2_sub, f2, d.out, lw.scale, ctx.views, **kw)
    return DotParts(base, update.astype(base.dtype), d.w_sub, d.out)


@dataclasses.dataclass(frozen=True)
class DotMatrices:
    """A dot_general with an adapted weight as matrices, for kinds whose update is not LoRA's
    ``s·(x·a)·b``: the frozen product ``base``, the adapter node ``weight`` (one layer: W's
    stack axes, if any, were sliced off by ``scan``), and its input ``x`` as a ``[rows, fan_in]``
    matrix (dropout applied; W's contracted axes flattened row-major, as `Adapter`'s
    ``as_matrices`` flattens W). `output` lays a ``[rows, fan_out]`` result out as the product;
    `frozen` is the frozen product of another ``[rows, fan_in]`` input; `along_outputs` lays a
    vector over W's outputs out to broadcast against the product. `dot_matrices` makes it.

    >>> import dataclasses, jax.numpy as jnp, lorax
    >>> from lorax import extend
    >>> @extend.register_kind
    ... @dataclasses.dataclass(frozen=True, repr=False)
    ... class Shift(extend.Adapter):                  # W + 1·vᵀ: adds sum(x)·v to each output
    ...     kind = "shift-example"
    ...     v: jnp.ndarray = extend.trained_field()
    ...     def layout(self):
    ...         return {"v": (*self.stack_axes, *self.b_axes)}
    ...     def merged(self):
    ...         return self.w + self.v
    >>> @extend.apply("dot_general", adapter=Shift)
    ... def shift_dot(eqn, invals, ctx):
    ...     m = extend.dot_matrices(eqn, invals, ctx)
    ...     return None if m is None else [m.base + m.output(m.x.sum(-1, keepdims=True) * m.weight.v)]
    >>> p = {"w": Shift(jnp.ones((4, 3)), jnp.array([0.0, 1.0, 2.0]))}
    >>> fn = lambda p, x: x @ p["w"]
    >>> lorax.lora(fn)(p, jnp.ones((1, 4))).tolist(), fn(lorax.merge(p), jnp.ones((1, 4))).tolist()
    ([[4.0, 8.0, 12.0]], [[4.0, 8.0, 12.0]])
    >>> del extend.KINDS["shift-example"], extend.RULES["dot_general"].apply[Shift]
    """

    base: jax.Array
    weight: Any
    x: jax.Array
    letters: DotLetters
    free_shape: tuple[int, ...]
    eqn: Any
    narrow: precision.Narrowing | None

    def _letters(self) -> tuple[list[str], list[str], list[str]]:
        """The letters of the rows (x's free axes), of W's contracted and of its output axes."""
        d, lw = self.letters, self.weight
        a_letters, b_letters = [d.w_sub[i] for i in lw.a_axes], [d.w_sub[i] for i in lw.b_axes]
        return [c for c in d.x_sub if c not in a_letters], a_letters, b_letters

    def output(self, y: jax.Array) -> jax.Array:
        """``y`` [rows, fan_out] laid out as the product's output, in its dtype."""
        free, _, b_letters = self._letters()
        y = y.reshape(*self.free_shape, *(self.weight.shape[i] for i in self.weight.b_axes))
        return jnp.transpose(y, [(free + b_letters).index(c) for c in self.letters.out]).astype(self.base.dtype)

    def frozen(self, x: jax.Array) -> jax.Array:
        """The frozen product of ``x`` [rows, fan_in] (an input the kind changed) with W."""
        free, a_letters, _ = self._letters()
        d = self.letters
        x = x.reshape(*self.free_shape, *(self.weight.shape[i] for i in self.weight.a_axes))
        x = jnp.transpose(x, [(free + a_letters).index(c) for c in d.x_sub]).astype(d.x.dtype)
        return dataclasses.replace(d, x=x).base(self.eqn, self.weight.w, self.narrow)

    def along_outputs(self, v: jax.Array) -> jax.Array:
        """``v`` [fan_out] reshaped to broadcast against the product's output."""
        _, _, b_letters = self._letters()
        out = self.letters.out
        v = v.reshape([self.weight.shape[i] for i in self.weight.b_axes])
        order = sorted(b_letters, key=out.index)
        v = jnp.transpose(v, [b_letters.index(c) for c in order])
        return v.reshape([v.shape[order.index(c)] if c in b_letters else 1 for c in out])


def dot_matrices(eqn, invals, ctx) -> DotMatrices | None:
    """`DotMatrices` of a dot_general with one adapted operand, or None (the weight is then
    materialized for this use) when both operands are adapted, when the product contracts W's
    output axes (a tied head ``x·Eᵀ``) or when W's stack axes are batch axes of the product
    (a stack used whole, as under ``vmap``). `DotMatrices`'s example is a kind built on it.

    >>> import dataclasses
    >>> from lorax.extend import DotMatrices
    >>> [f.name for f in dataclasses.fields(DotMatrices)][:3]
    ['base', 'weight', 'x']
    """
    d = dot_letters(eqn, invals)
    if d is None:
        return None
    lw = d.t.weight
    a_letters, b_letters = [d.w_sub[i] for i in lw.a_axes], [d.w_sub[i] for i in lw.b_axes]
    if lw.stack_axes or any(c in d.out for c in a_letters) or any(c not in d.out for c in b_letters):
        return None
    x = d.t.adapter_input(d.x, ctx.next_use())
    sizes = dict(zip(d.x_sub, jnp.shape(x)))
    free = [c for c in d.x_sub if c not in a_letters]
    size = lambda letters: math.prod(sizes[c] for c in letters)  # noqa: E731
    matrix = ctx.views.matrix(x, d.x_sub, free, a_letters, size)
    base = d.base(eqn, lw.w, ctx.narrow)
    return DotMatrices(base, lw, matrix, d, tuple(sizes[c] for c in free), eqn, ctx.narrow)


def factors_dot(eqn, invals, ctx) -> list[jax.Array] | None:
    """The product rule of a kind whose update is a LoRA of factors it derives: the node's
    ``factors()`` gives ``(down [fan_in, r], up [r, fan_out])`` (one layer), and the product is
    ``x·W + s·(x·down)·up`` with ``s`` its ``scale``; None (materialized) where `dot_matrices`
    is. LoHa's face-splitting factors and VeRA's rescaled projections use it.

    >>> import dataclasses, jax.numpy as jnp, lorax
    >>> from lorax import extend
    >>> @extend.register_kind
    ... @dataclasses.dataclass(frozen=True, repr=False)
    ... class Tied(extend.Additive):                  # W + s·a·aᵀ, for a square W
    ...     kind = "tied-example"
    ...     a: jnp.ndarray = extend.trained_field()
    ...     def layout(self):
    ...         return {"a": (*self.stack_axes, *self.a_axes, extend.RANK)}
    ...     def factors(self):
    ...         return self.a, self.a.T
    ...     def delta(self):
    ...         return self.scale * self.a @ self.a.T
    >>> _ = extend.apply("dot_general", adapter=Tied)(extend.factors_dot)
    >>> p = {"w": Tied(jnp.eye(3), jnp.ones((3, 1)), scale=2.0)}
    >>> fn = lambda p, x: x @ p["w"]
    >>> lorax.lora(fn)(p, jnp.ones((1, 3))).tolist(), fn(lorax.merge(p), jnp.ones((1, 3))).tolist()
    ([[7.0, 7.0, 7.0]], [[7.0, 7.0, 7.0]])
    >>> del extend.KINDS["tied-example"], extend.RULES["dot_general"].apply[Tied]
    """
    m = dot_matrices(eqn, invals, ctx)
    if m is None:
        return None
    down, up = (f.astype(m.x.dtype) for f in m.weight.factors())
    return [m.base + m.output((m.x @ down) * m.weight.scale @ up)]


# ----------------------------------------------------------------------------- convolution


def _plain_conv(eqn) -> bool:
    return (eqn.params["feature_group_count"], eqn.params["batch_group_count"]) == (1, 1)


@rule("conv_general_dilated", kind="product")
def _read_conv(eqn, vs, walk):
    if vs[1] is None or not _plain_conv(eqn):
        return [None], []
    return [None], [use_of(vs[1], "conv_general_dilated", eqn.params["dimension_numbers"].rhs_spec[1:], ())]


def conv_parts(eqn, invals, ctx) -> tuple[jax.Array, jax.Array, int] | None:
    """``(base, x * conv(a), out_axis)``: the frozen convolution and the window convolution
    of the input to ``rank`` channels (``b`` still to apply along ``out_axis``)."""
    x, t = invals
    if is_tracked(x) or not is_tracked(t) or not _plain_conv(eqn):
        return None
    lw = t.weight
    _, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    if lw.stack_axes or lw.b_axes != (rhs_spec[0],):
        return None
    base = base_product(eqn, [x, lw.w], 1)
    y = compat.bind(eqn, [t.adapter_input(x, ctx.next_use()), as_kernel(lw, rhs_spec[0])])[0]
    return base, y, out_spec[1]


# ----------------------------------------------------------------------------- lookup


def _full_axis(eqn, ndim: int) -> int | None:
    """The one operand axis a gather takes whole (an embedding's feature axis), if any."""
    dn, p = eqn.params["dimension_numbers"], eqn.params
    full = [k for k in range(ndim) if k not in (*dn.collapsed_slice_dims, *dn.start_index_map,
                                                 *dn.operand_batching_dims)
            and p["slice_sizes"][k] == eqn.invars[0].aval.shape[k]]
    return full[0] if len(full) == 1 else None


@rule("gather", kind="product")
def _read_gather(eqn, vs, walk):
    v = vs[0]
    j = None if v is None else _full_axis(eqn, len(v.axes))
    if v is None or j is None:
        return [None], []
    return [None], [use_of(v, "gather", [k for k in range(len(v.axes)) if k != j], (), lookup=True)]


def gather_parts(eqn, invals, ctx) -> tuple[jax.Array, jax.Array, int] | None:
    """``(base, rows of a, axis)``: the frozen lookup and the looked-up rows of ``a`` (rank
    wide, ``b`` still to apply along ``axis``)."""
    t, indices = invals
    if not is_tracked(t) or is_tracked(indices):
        return None
    lw = t.weight
    dn = eqn.params["dimension_numbers"]
    (j,) = lw.b_axes if len(lw.b_axes) == 1 else (None,)
    if j is None or lw.stack_axes or j != _full_axis(eqn, len(lw.shape)):
        return None
    base = base_product(eqn, [lw.w, indices], 0)
    sizes = list(eqn.params["slice_sizes"])
    sizes[j] = lw.rank
    y = compat.bind(eqn, [as_kernel(lw, j), indices], slice_sizes=tuple(sizes))[0]
    kept = [i for i in range(len(lw.shape)) if i not in (*dn.collapsed_slice_dims, *dn.operand_batching_dims)]
    return base, y, dn.offset_dims[kept.index(j)]


# ----------------------------------------------------------------------------- shared


def as_kernel(lw, width_axis: int) -> jax.Array:
    """Lay ``a`` out like ``w`` with ``width_axis`` holding the rank (a conv kernel or table)."""
    subs = lw.subscripts()
    rank = subs["a"][-1]
    target = "".join(rank if i == width_axis else subs["w"][i] for i in range(len(lw.shape)))
    return jnp.einsum(f"{subs['a']}->{target}", lw.a.astype(lw.w.dtype))


def apply_b(y: jax.Array, axis: int, b: jax.Array, scale: float) -> jax.Array:
    """Contract ``y``'s rank axis ``axis`` with ``b`` [r, out], putting out in its place."""
    y = jnp.moveaxis(y * scale, axis, -1)
    return jnp.moveaxis(jnp.tensordot(y, b.astype(y.dtype), axes=1), -1, axis)
