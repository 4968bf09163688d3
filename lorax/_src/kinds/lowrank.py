"""The low-rank update ``s·(x·A)·B`` as two thin matrix products.

An activation ``x`` usually has several leading axes (batch, sequence, heads). Written as
einsums over those axes, the gradient of ``B`` contracts over all of them, and XLA:CPU
then copies the output gradient into a transposed layout — fused with the activation's
backward and run in a cache-hostile order, it costs more than the whole big matmul that
LoRA saves. So both products are done on 2-D views: ``x`` as [rows, features], the
factors as [features, rank] and [rank, outputs]. Reshapes of contiguous axes are free;
the factors are tiny, so their transposes cost nothing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


class Views:
    """The 2-D views of activations made during one `lorax.lora` call.

    Adapters reading the same input (q, k and v read one normalized ``x``) share one view,
    so JAX saves one residual for their gradients instead of one per adapter."""

    def __init__(self):
        self._made: dict = {}

    def matrix(self, x: jax.Array, sub: str, rows: list[str], cols: list[str], size) -> jax.Array:
        key = (id(x), sub, tuple(rows), tuple(cols))
        made = self._made.get(key)
        if made is None or made[0] is not x:  # ids of dead arrays are reused
            made = self._made[key] = (x, _matrix(x, sub, rows, cols, size))
        return made[1]


def low_rank_update(x_sub: str, x: jax.Array, first_sub: str, first: jax.Array, second_sub: str,
                    second: jax.Array, out_sub: str, scale: float, views: Views | None = None,
                    **kw) -> jax.Array:
    """``scale · einsum(f"{x_sub},{first_sub},{second_sub}->{out_sub}")``, as ``(x·first)·second``.

    The intermediate is rank-sized; the scale is applied there, where it is cheapest.
    ``kw`` (``precision``, ``preferred_element_type``) goes to both products; ``views``
    shares the 2-D view of ``x`` with other updates reading it.

    >>> x, a, b = jnp.ones((2, 4, 3)), jnp.ones((3, 2)), jnp.ones((2, 5, 6))
    >>> y = low_rank_update("bsd", x, "dr", a, "rhk", b, "bshk", 0.5)
    >>> y.shape, float(y[0, 0, 0, 0])
    ((2, 4, 5, 6), 3.0)
    """
    summed = [c for c in x_sub if c in first_sub and c not in out_sub and c not in second_sub]
    free = [c for c in x_sub if c not in summed]
    inner = [c for c in first_sub if c not in summed]
    outer = [c for c in second_sub if c not in inner]
    plain = (set(first_sub) == set(summed + inner) and set(second_sub) == set(inner + outer)
             and set(out_sub) == set(free + outer) and not set(free) & set(first_sub + second_sub))
    if not plain:  # batch axes shared with the weight (a stack used as such): plain einsums
        keep = "".join(c for c in dict.fromkeys(x_sub + first_sub) if c in out_sub or c in second_sub)
        t = jnp.einsum(f"{x_sub},{first_sub}->{keep}", x, first, **kw) * scale
        return jnp.einsum(f"{keep},{second_sub}->{out_sub}", t, second.astype(t.dtype), **kw)

    sizes = dict(zip(x_sub, x.shape)) | dict(zip(first_sub, first.shape)) | dict(zip(second_sub, second.shape))
    size = lambda letters: math.prod(sizes[c] for c in letters)  # noqa: E731
    views = views or Views()
    f2 = _matrix(first, first_sub, summed, inner, size)
    s2 = _matrix(second, second_sub, inner, outer, size).astype(jnp.result_type(x, first))
    dot = functools.partial(jnp.matmul, **kw)
    rows_first = x_sub.index(summed[0]) > x_sub.index(free[-1]) if summed and free else True
    if rows_first:  # x is [rows, features]: keep its layout
        y = dot(dot(views.matrix(x, x_sub, free, summed, size), f2) * scale, s2)
        y_sub = free + outer
    else:  # x is [features, rows]: work on transposed products instead of copying x
        y = dot(s2.T, dot(f2.T, views.matrix(x, x_sub, summed, free, size)) * scale)
        y_sub = outer + free
    y = y.reshape([sizes[c] for c in y_sub])
    return jnp.transpose(y, [y_sub.index(c) for c in out_sub])


def _matrix(x: jax.Array, sub: str, rows: list[str], cols: list[str], size) -> jax.Array:
    """``x`` with axes ``rows`` then ``cols``, reshaped to 2-D."""
    x = jnp.transpose(x, [sub.index(c) for c in rows + cols])
    return x.reshape(size(rows), size(cols))
