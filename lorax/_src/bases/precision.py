"""Products of frozen low-precision weights, with their backward in the weights' precision.

A model that multiplies bf16 (or fp16) operands and accumulates in fp32
(``preferred_element_type=float32``) gets an fp32 cotangent back. JAX transposes the product
into ``cotangent_fp32 · W_bf16``, which XLA:CPU computes by converting ``W`` to fp32 on every
step: a per-step fp32 copy of a frozen weight, multiplied on the fp32 engine at a fraction of
the bf16 one's speed. Inside `lorax.lora`, the products of frozen weights (the base of every
adapter, each plain bf16/fp16 matrix of ``params``, and a quantized weight a model casts to bf16
where it multiplies) take the cotangent in the operands' dtype instead, as torch's autocast
does: the gradient reaching a bf16 operand is rounded to bf16 anyway, so rounding the cotangent
first changes it by about one bf16 rounding. A model that casts its fp32 activations to bf16 where
it multiplies them gets their gradient unrounded: the product takes the fp32 array and casts it
itself (`Narrowing`), so the gradient is returned in fp32, as accumulated.

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


class Narrowing:
    """The bf16 backward of frozen products during one `lorax.lora` call, and the bf16 casts
    of wider arrays it has seen there (`note`). A product whose operand is such a cast takes
    the wider array itself (`source`, `narrow_dot`): the gradient reaching that array comes
    back as accumulated, not rounded to bf16 and widened again.

    >>> import jax, jax.numpy as jnp
    >>> def cast(x):
    ...     eqn = jax.make_jaxpr(lambda x: x.astype(jnp.bfloat16))(x).eqns[0]
    ...     return eqn, x.astype(jnp.bfloat16)
    >>> narrowing, x = Narrowing(), jnp.ones(3)
    >>> eqn, x16 = cast(x)
    >>> narrowing.note(eqn, [x], [x16])
    >>> narrowing.source(x16) is x, narrowing.source(x) is x
    (True, True)
    """

    def __init__(self) -> None:
        self._casts: dict[int, tuple[Any, Any]] = {}  # id of the bf16 cast: (the cast, its source)

    def note(self, eqn, invals: list, outvals: list) -> None:
        """Remember ``outvals[0]`` as a bf16 cast of ``invals[0]`` where ``eqn`` is one: a
        ``convert_element_type`` to bf16 of a wider float array."""
        if eqn.primitive.name != "convert_element_type" or not narrowed(eqn.params["new_dtype"]):
            return
        source = invals[0]
        dtype = getattr(source, "dtype", None)
        if dtype is not None and _is_float(dtype) and jnp.finfo(dtype).bits > jnp.finfo(NARROW).bits:
            self._casts[id(outvals[0])] = (outvals[0], source)

    def source(self, x: Any) -> Any:
        """The wider array ``x`` is a noted bf16 cast of, else ``x``."""
        seen = self._casts.get(id(x))
        return seen[1] if seen is not None and seen[0] is x else x  # ids of dead arrays are reused


def _is_float(dtype: Any) -> bool:
    return not jnp.issubdtype(dtype, jax.dtypes.extended) and jnp.issubdtype(dtype, jnp.floating)


def narrow_dot(x: jax.Array, y: jax.Array, subscripts: tuple[str, str, str], precision: Any,
               preferred_element_type: Any) -> jax.Array:
    """``einsum(lhs,rhs->out)`` of two operands multiplied as bf16 and accumulated in
    ``preferred_element_type``; each operand is bf16 (or bf16 bits), or a wider float array cast
    to bf16 here. Its backward multiplies the cotangent rounded to bf16 (still accumulating
    wide) and returns each gradient in its operand's dtype: rounded to bf16 for a bf16 operand,
    as accumulated for a wider one. The product is an ordinary ``dot_general`` outside the custom
    derivative, which carries the backward alone: a ``jax.checkpoint`` policy that saves dots
    saves it as it would the plain product.

    >>> import jax, jax.numpy as jnp
    >>> x, w = jnp.ones((2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16)
    >>> f = lambda x: narrow_dot(x, w, ("ij", "jk", "ik"), None, jnp.float32).sum()
    >>> f(x).dtype, jax.grad(f)(x).dtype, float(jax.grad(f)(x)[0, 0])
    (dtype('float32'), dtype(bfloat16), 3.0)
    >>> jax.grad(f)(x.astype(jnp.float32)).dtype    # an fp32 operand, cast here: its gradient in fp32
    dtype('float32')
    """
    wide = np.dtype(preferred_element_type)
    lhs, rhs, out = subscripts
    # the product itself is an ordinary dot_general, so remat policies that save dots save it
    product = jnp.einsum(f"{lhs},{rhs}->{out}", jax.lax.stop_gradient(as_narrow(x)),
                         jax.lax.stop_gradient(as_narrow(y)), precision=precision, preferred_element_type=wide)
    try:
        return _narrow(subscripts, (_gradient_dtype(x), _gradient_dtype(y)), precision, wide, x, y, product)
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise TypeError(
            "lorax.lora: forward-mode differentiation (jax.jvp, jax.jacfwd) of a product with a frozen bf16 "
            f"weight (operands {x.shape} and {y.shape}) is not supported with the bf16 backward; call "
            "lorax.lora(fn, low_precision_backward=False) to keep JAX's own rules.") from error


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _narrow(subscripts, dtypes, precision, wide, x, y, product):
    """``product`` (the dot of ``x`` and ``y``, computed outside), with the narrow backward to
    ``x`` and ``y``, their gradients in ``dtypes``."""
    return product


def as_values(x: jax.Array) -> jax.Array:
    """A product operand as bf16 values: a frozen weight carried through a scan as its uint16
    bits (`lorax._src.bases.bits`) reinterpreted, any other array as it is. `narrow_dot` calls
    it inside its custom derivative, so that the backward keeps the bits."""
    return jax.lax.bitcast_convert_type(x, NARROW) if x.dtype == BITS else x


def as_narrow(x: jax.Array) -> jax.Array:
    """A product operand as the bf16 values it is multiplied as: `as_values`, a wider array cast."""
    return as_values(x).astype(NARROW)


def _narrow_fwd(subscripts, dtypes, precision, wide, x, y, product):
    """Keeps only what the needed gradients use: ``y`` for ``x``'s, ``x`` for ``y``'s. A frozen
    weight is not perturbed, so its gradient is never computed and ``x`` never saved."""
    return product.value, (x.value if y.perturbed else None, y.value if x.perturbed else None)


def _gradient_dtype(x: jax.Array) -> np.dtype:
    """The dtype of an operand's gradient: its own, bf16 for bits (an operand carried as bits is
    frozen; the gradient is never computed)."""
    return NARROW if x.dtype == BITS else np.dtype(x.dtype)


def _narrow_bwd(subscripts, dtypes, precision, wide, residuals, g):
    (x, y), (x_dtype, y_dtype) = residuals, dtypes
    if isinstance(g, SymbolicZero):
        return None, None, None
    lhs, rhs, out = subscripts
    g = g.astype(NARROW)
    dx = None if y is None else jnp.einsum(f"{out},{rhs}->{lhs}", g, as_narrow(y), precision=precision,
                                           preferred_element_type=wide).astype(x_dtype)
    dy = None if x is None else jnp.einsum(f"{out},{lhs}->{rhs}", g, as_narrow(x), precision=precision,
                                           preferred_element_type=wide).astype(y_dtype)
    return dx, dy, None


_narrow.defvjp(_narrow_fwd, _narrow_bwd, symbolic_zeros=True)
