"""A frozen bf16 stack carried through ``scan`` as its bits (uint16), so that no layer loop
holds an fp32 copy of it.

XLA:CPU has no bf16 dynamic-slice: it slices an fp32 copy of the stack, and since that copy
does not change from one layer to the next it is made once, before the loop, for the whole
stack (in SmolLM2-135M, 405 MiB for 203 MiB of bf16 weights, on every step). The scan rule
(`lorax._src.tracing.rules.control`) hands ``lax.scan`` the stack's bits instead, which
slice as integers, and each layer's product reinterprets its slice as bf16 where it is used:
inside the product's own custom derivative or ``jax.checkpoint``, so that the backward keeps
the slice of the scan's input rather than a stacked bf16 copy of it. XLA:CPU still writes
the bits once before the loop (reinterpreting is an elementwise op to it): a copy half the
fp32 one's size, and nothing is converted inside the loop. Views of the bits
(transposes, slices) are views of the weight. Only the scan rule makes one; a `Bits` is
never in a tree.

Bits carry no gradient. An adapter's base is gradient-stopped, so it always goes as bits; a
plain bf16 stack of ``params`` goes as bits only when nothing differentiates it (`frozen_bits`
says so where it is made). A transform applied later to a traced program (``jax.grad`` of a
``jax.jit``-ed `lorax.lora` function, taken with respect to such a stack) finds the bits in
the way and raises an error that names the fix.

>>> import jax.numpy as jnp
>>> w = jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(2, 3)
>>> b = Bits.of(w)
>>> b.bits.dtype, b.dtype, b.shape, bool((b.dequantize() == w).all())
(dtype('uint16'), dtype(bfloat16), (2, 3), True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from lorax._src import compat
from lorax._src.bases.at_use import product_at_use
from lorax._src.bases.precision import BITS, NARROW, as_values


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
@dataclasses.dataclass(frozen=True)
class Bits:
    """A bf16 weight held as its uint16 ``bits``; ``dequantize`` reinterprets them."""

    bits: jax.Array

    @classmethod
    def of(cls, w: jax.Array) -> Bits:
        return cls(frozen_bits(w))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return NARROW

    def dequantize(self) -> jax.Array:
        return as_values(self.bits)

    def lorax_product(self, eqn, operands: list, position: int) -> jax.Array:
        """The product with this weight at ``operands[position]``, reinterpreted at this use
        (`lorax._src.bases.at_use`): the backward keeps the bits, not a bf16 copy."""
        return product_at_use(self, eqn, operands, position)

    def view(self, eqn, rest: list) -> Bits:
        """A layout view (transpose, slice, squeeze, copy) of the weight: the same of its bits."""
        return Bits(compat.bind(eqn, [self.bits, *rest])[0])
