"""Products of frozen low-precision weights, with their backward in the weights' precision.

A model that multiplies bf16 (or fp16) operands and accumulates in fp32
(``preferred_element_type=float32``) gets an fp32 cotangent back. JAX transposes the product
into ``cotangent_fp32 · W_bf16``, which XLA:CPU computes by converting ``W`` to fp32 on every
step: a per-step fp32 copy of a frozen weight, multiplied on the fp32 engine at a fraction of
the bf16 one's speed. Inside `lorax.lora`, the products of frozen weights (the base of every
adapter, each plain bf16/fp16 matrix of ``params``, and a quantized weight a model casts to bf16
where it multiplies) take the cotangent in the operands' dtype instead, as torch's autocast
does: the gradient reaching a bf16 operand is rounded to bf16 anyway, so rounding the cotangent
first changes it by about one bf16 rounding.

Only bf16 is narrowed. fp16 has bf16's precision but not its range: an fp16 cotangent
underflows (a softmax gradient over many classes is mostly below fp16's smallest normal), so
fp16 products keep JAX's own fp32 backward.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

NARROW = jnp.dtype(jnp.bfloat16)
BITS = np.dtype(np.uint16)  # a bf16 weight carried as its bits (`lorax._src.bases.bits`)


def narrowed(dtype: Any) -> bool:
    """Whether products of ``dtype`` operands take their backward in that dtype (bf16 only).
    Extended dtypes (typed PRNG keys) and anything that is not a dtype answer ``False``.

    >>> import jax, jax.numpy as jnp
    >>> narrowed(jnp.bfloat16), narrowed(jnp.float16), narrowed(jax.random.key(0).dtype)
    (True, False, False)
    """
    if dtype is None or jnp.issubdtype(dtype, jax.dtypes.extended):
        return False
    try:
        return np.dtype(dtype) == NARROW
    except TypeError:
        return False


def frozen_low_precision(leaf: Any) -> bool:
    """Whether a plain ``params`` leaf is a bf16 matrix (or stack of them), whose products
    `lorax.lora` computes with `narrow_dot`."""
    return narrowed(getattr(leaf, "dtype", None)) and len(getattr(leaf, "shape", ())) >= 2


def widens(eqn) -> bool:
    """Whether a dot_general multiplies two bf16 operands into a wider output (the case
    `narrow_dot` is for)."""
    lhs, rhs = (v.aval.dtype for v in eqn.invars)
    out = eqn.params.get("preferred_element_type")
    return (lhs == rhs and narrowed(lhs) and out is not None
            and jnp.finfo(out).bits > jnp.finfo(lhs).bits and eqn.params.get("out_sharding") is None)


def narrow_dot(x: jax.Array, y: jax.Array, subscripts: tuple[str, str, str], precision: Any,
               preferred_element_type: Any) -> jax.Array:
    """``einsum(lhs,rhs->out)`` of two low-precision operands accumulated in
    ``preferred_element_type``; its backward multiplies the cotangent rounded to the
    operands' dtype (still accumulating wide) and rounds each gradient to its operand's dtype.
    The product is an ordinary ``dot_general`` outside the custom derivative, which carries the
    backward alone: a ``jax.checkpoint`` policy that saves dots saves it as it would the plain
    product.

    >>> import jax, jax.numpy as jnp
    >>> x, w = jnp.ones((2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16)
    >>> f = lambda x: narrow_dot(x, w, ("ij", "jk", "ik"), None, jnp.float32).sum()
    >>> f(x).dtype, jax.grad(f)(x).dtype, float(jax.grad(f)(x)[0, 0])
    (dtype('float32'), dtype(bfloat16), 3.0)
    """
    wide = np.dtype(preferred_element_type)
    lhs, rhs, out = subscripts
    # the product itself is an ordinary dot_general, so remat policies that save dots save it
    product = jnp.einsum(f"{lhs},{rhs}->{out}", jax.lax.stop_gradient(as_values(x)),
                         jax.lax.stop_gradient(as_values(y)), precision=precision, preferred_element_type=wide)
    try:
        return _narrow(subscripts, precision, wide, x, y, product)
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise TypeError(
            "lorax.lora: forward-mode differentiation (jax.jvp, jax.jacfwd) of a product with a frozen bf16 "
            f"weight (operands {x.shape} and {y.shape}) is not supported with the bf16 backward; call "
            "lorax.lora(fn, low_precision_backward=False) to keep JAX's own rules.") from error


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _narrow(subscripts, precision, wide, x, y, product):
    """``product`` (the dot of ``x`` and ``y``, computed outside), with the narrow backward to ``x`` and ``y``."""
    return product


def as_values(x: jax.Array) -> jax.Array:
    """A product operand as bf16 values: a frozen weight carried through a scan as its uint16
    bits (`lorax._src.bases.bits`) reinterpreted, any other array as it is. `narrow_dot` calls
    it inside its custom derivative, so that the backward keeps the bits."""
    return jax.lax.bitcast_convert_type(x, NARROW) if x.dtype == BITS else x


def _narrow_fwd(subscripts, precision, wide, x, y, product):
    """Keeps only what the needed gradients use: ``y`` for ``x``'s, ``x`` for ``y``'s. A frozen
    weight is not perturbed, so its gradient is never computed and ``x`` never saved."""
    return product.value, (x.value if y.perturbed else None, y.value if x.perturbed else None)


def _narrow_bwd(subscripts, precision, wide, residuals, g):
    x, y = residuals
    if isinstance(g, SymbolicZero):
        return None, None, None
    lhs, rhs, out = subscripts
    g = g.astype(NARROW)
    dx = None if y is None else jnp.einsum(f"{out},{rhs}->{lhs}", g, as_values(y), precision=precision,
                                           preferred_element_type=wide).astype(NARROW)
    dy = None if x is None else jnp.einsum(f"{out},{lhs}->{rhs}", g, as_values(x), precision=precision,
                                           preferred_element_type=wide).astype(NARROW)
    return dx, dy, None


_narrow.defvjp(_narrow_fwd, _narrow_bwd, symbolic_zeros=True)
