"""`lorax.Bf16Bits`: a frozen bf16 weight held as its bits (uint16), so that XLA:CPU never
copies it to fp32.

XLA:CPU has no bf16 slice: it slices an fp32 copy of a bf16 stack, and since that copy does
not change from one layer to the next it is made once, before the loop, for the whole stack
(in SmolLM2-135M, 405 MiB for 203 MiB of bf16 weights, on every step); the same holds for a
bf16 table sliced in a loop (a loss over vocabulary slices). Held as bits, a weight slices as
integers, and each product reinterprets its own slice as bf16 where it is used: inside the
product's own custom derivative or ``jax.checkpoint``, so that the backward keeps the slice of
the bits rather than a bf16 copy. Views of the bits (transposes, slices) are views of the
weight.

Two ways in:

- `lorax.quantize` ``(params, "bf16")`` holds the chosen weights as bits in the tree, so the
  step's arguments are the bits themselves: nothing is copied;
- inside `lorax.lora`, the scan rule (`lorax._src.tracing.rules.control`) hands ``lax.scan``
  a plain bf16 stack's bits, made from the bf16 argument: XLA:CPU writes that
  reinterpretation once per step (an elementwise op to it), half the fp32 copy's size.

Bits carry no gradient. An adapter's base is gradient-stopped, so it always goes as bits; a
plain bf16 stack of ``params`` goes as bits only when nothing differentiates it (`frozen_bits`
says so where it is made). A transform applied later to a traced program (``jax.grad`` of a
``jax.jit``-ed `lorax.lora` function, taken with respect to such a stack) finds the bits in
the way and raises an error that names the fix.

>>> import jax.numpy as jnp, lorax
>>> w = jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(2, 3)
>>> b = lorax.quantize({"w": w}, "bf16")["w"]
>>> b, b.bits.dtype, bool((b.dequantize() == w).all())
(Bf16Bits(bfloat16[2, 3]), dtype('uint16'), True)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from lorax._src import compat
from lorax._src.bases.at_use import product_at_use
from lorax._src.bases.precision import BITS, NARROW, as_values

BF16 = "bf16"  # the `lorax.quantize` format that holds a weight as its bits


def carried_as_bits(w: Any) -> bool:
    """Whether a frozen base is a plain bf16 array with a stack axis to scan over."""
    return isinstance(w, jax.Array | np.ndarray) and w.dtype == NARROW and w.ndim >= 3


class Differentiated(Exception):
    """A bf16 stack to be carried as bits turned out to be differentiated."""


def frozen_bits(w: jax.Array) -> jax.Array:
    """``w``'s bits (uint16). Raises `Differentiated` where ``w`` is differentiated: at once
    when the differentiation is under way as the bits are made (the scan rule then keeps the
    bf16 stack), or when a later transform differentiates the traced program.

    >>> import jax, jax.numpy as jnp
    >>> w = jnp.ones((2, 3, 4), jnp.bfloat16)
    >>> frozen_bits(w).dtype
    dtype('uint16')
    >>> try:
    ...     jax.grad(lambda w: frozen_bits(w).sum().astype(float))(w)
    ... except Differentiated:
    ...     print("differentiated")
    differentiated
    """
    return _bits(w)


@jax.custom_jvp
def _bits(w):
    return lax.bitcast_convert_type(w, BITS)


@functools.partial(_bits.defjvp, symbolic_zeros=True)
def _bits_jvp(primals, tangents) -> tuple[Any, Any]:
    (w,), (dw,) = primals, tangents
    if not isinstance(dw, SymbolicZero):
        raise Differentiated(
            f"lorax.lora: a frozen bf16 stack {tuple(w.shape)} is differentiated through a scan, where lorax "
            "carries it as bits (XLA:CPU would otherwise copy it to fp32 on every step); differentiate it outside "
            "jax.jit, or call lorax.lora(fn, low_precision_backward=False) to keep it bf16.")
    return _bits(w), np.zeros(w.shape, jax.dtypes.float0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class Bf16Bits:
    """A frozen bf16 weight held as its uint16 ``bits``; `dequantize` reinterprets them.

    Make one with `lorax.quantize` ``(params, "bf16")``. It stands wherever the weight did (as
    an adapter's frozen ``w`` too): `lorax.lora` reinterprets it at each use, `lorax.merge`
    returns the bf16 weight, `lorax.split` puts it in the frozen half. It is frozen: ``jax.grad``
    with respect to it is refused (uint16 carries no gradient).

    >>> import jax.numpy as jnp, lorax
    >>> b = lorax.quantize({"w": jnp.ones((4, 3))}, "bf16")["w"]
    >>> b.shape, b.dtype, b.nbytes, b.dequantize().dtype
    ((4, 3), dtype(bfloat16), 24, dtype(bfloat16))
    """

    bits: Any
    fmt = BF16

    @classmethod
    def of(cls, w: jax.Array) -> Bf16Bits:
        """``w``'s bits, inside `lorax.lora`: refused where ``w`` is differentiated."""
        return cls(frozen_bits(w))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return 2 * self.size

    @property
    def dtype(self) -> np.dtype:
        return NARROW

    def dequantize(self) -> jax.Array:
        """The bf16 weight (its bits reinterpreted: exact)."""
        return as_values(jnp.asarray(self.bits))

    def __repr__(self) -> str:
        return f"Bf16Bits(bfloat16{list(self.shape)})"

    def lorax_product(self, eqn, operands: list, position: int,
                      bind: Callable[[Any, list], jax.Array] | None = None) -> jax.Array:
        """The product with this weight at ``operands[position]``, reinterpreted at this use
        under ``jax.checkpoint``: the backward keeps the bits, not a bf16 copy. ``bind(eqn,
        operands)`` evaluates it on the weight as it is (the bf16 backward's product, which
        reinterprets the bits inside its own derivative). A lookup (``gather``) looks up the
        bits and reinterprets the rows it took; an index out of range gives NaN rows, as a bf16
        table's lookup does."""
        if eqn.primitive.name == "gather" and position == 0:
            fill = eqn.params.get("fill_value")
            fill = NAN_BITS if fill is None else int(np.asarray(fill, NARROW).view(BITS))
            return as_values(compat.bind(eqn, [self.bits, *operands[1:]], fill_value=fill)[0])
        return bind(eqn, operands) if bind else product_at_use(self, eqn, operands, position)

    def view(self, eqn, rest: list) -> Bf16Bits:
        """A layout view (transpose, slice, squeeze, copy) of the weight: the same of its bits."""
        return Bf16Bits(compat.bind(eqn, [self.bits, *rest])[0])


def held_as_bits(x: Any, where: str) -> Bf16Bits:
    """``x`` rounded to bf16 (exact when ``x`` is bf16) and held as its bits. A concrete ``x``
    must be finite and within bf16's range (a traced one is not checked); ``where`` names it."""
    x = jnp.asarray(x)
    values = x.astype(NARROW)
    if not compat.is_tracer(values) and not bool(jnp.all(jnp.isfinite(values))):
        bad = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(f"{where}: the weight holds NaN or inf ({bad} values)." if bad else
                         f"{where}: its largest magnitude {float(jnp.max(jnp.abs(x))):.6g} overflows "
                         f"bf16 (largest {float(jnp.finfo(NARROW).max):.6g}); scale it down.")
    return Bf16Bits(lax.bitcast_convert_type(values, BITS))


NAN_BITS = int(np.array(np.nan, NARROW).view(BITS))  # what a bf16 lookup out of range fills in
