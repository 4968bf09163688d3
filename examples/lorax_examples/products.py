"""The example models' products, with an optional compute dtype (bf16 operands, fp32 results).

`cast_dot` is the product itself; `matmul` runs it under `jax.checkpoint`, for products whose
backward should keep their fp32 input rather than a cast copy of it. `bf16_bits` and
`bf16_of_bits` hold an array the step slices or saves in a loop as its bf16 bits: XLA:CPU slices
and writes a bf16 array in a loop through an fp32 copy of the whole array, bits as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cast_dot(x, w, dimension_numbers, dtype=None):
    """``lax.dot_general(x, w)``; with ``dtype``, of ``x`` and ``w`` cast to it, accumulated and
    returned in fp32.

    >>> import jax.numpy as jnp
    >>> cast_dot(jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (0,)), ((), ())), jnp.bfloat16).dtype
    dtype('float32')
    """
    if dtype is None:
        return jax.lax.dot_general(x, w, dimension_numbers)
    return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), dimension_numbers,
                               preferred_element_type=jnp.float32)


def matmul(x, w, dimension_numbers, dtype=None):
    """`cast_dot`. With ``dtype`` the cast sits under `jax.checkpoint`, so the backward keeps
    ``x`` as it came (fp32) and recasts it, rather than keeping a bf16 copy."""
    if dtype is None:
        return cast_dot(x, w, dimension_numbers)
    return jax.checkpoint(lambda x, w: cast_dot(x, w, dimension_numbers, dtype))(x, w)


def bf16_bits(x):
    """``x`` rounded to bf16, as its bits (uint16).

    >>> import jax.numpy as jnp
    >>> bits = bf16_bits(jnp.array([1.0, -2.5]))
    >>> bits.dtype, bf16_of_bits(bits).tolist()
    (dtype('uint16'), [1.0, -2.5])
    """
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def bf16_of_bits(bits):
    """The bf16 values whose bits are ``bits`` (`bf16_bits`)."""
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
