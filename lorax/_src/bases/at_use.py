"""The product of a frozen base that is not a plain array, dequantized where it is used.

>>> import jax, jax.numpy as jnp, lorax
>>> q = lorax.quantize({"w": jnp.ones((64, 2))}, "int8")["w"]
>>> eqn = jax.make_jaxpr(jnp.dot)(jnp.ones((1, 64)), jnp.ones((64, 2))).eqns[0]
>>> product_at_use(q, eqn, [jnp.ones((1, 64)), q], 1).tolist()
[[64.0, 64.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lorax._src import compat


def product_at_use(base: Any, eqn, operands: list, position: int,
                   bind: Callable[[Any, list], jax.Array] | None = None) -> jax.Array:
    """``eqn`` with ``base.dequantize()`` at ``operands[position]``, evaluated by ``bind(eqn,
    operands)`` (by default, the equation itself). Under ``jax.checkpoint``: the backward
    dequantizes again rather than keep the dense weight as a residual (in a ``scan``, every
    layer's); XLA may fuse the dequantization into the product."""

    def product(weight, *others):
        full = list(others)
        full.insert(position, weight.dequantize())
        return bind(eqn, full) if bind else compat.bind(eqn, full)[0]

    others = [x for i, x in enumerate(operands) if i != position]
    return jax.checkpoint(product)(base, *others)
