"""Matmul flops of a JAX function with every loop iteration counted.

XLA's ``compiled.cost_analysis()["flops"]`` counts a while loop's body once, whatever its trip
count: a model whose layers run under ``scan`` is billed for one layer. For step costs and
efficiencies (flops over time, against the machine's matmul rate) we count from the jaxpr
instead: ``dot_general`` and convolutions, ``scan`` bodies times their length, ``cond`` at its
costliest branch, and every nested call (jit, remat, custom derivatives) entered.

>>> import jax, jax.numpy as jnp
>>> def layers(ws, x):
...     return jax.lax.scan(lambda x, w: (x @ w, None), x, ws)[0]
>>> matmul_flops(layers, jnp.ones((4, 8, 8)), jnp.ones((2, 8)))  # 4 layers of 2 x 8 x 8
1024
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr


def matmul_flops(fn: Callable, *args) -> int:
    """2 x multiply-adds of every matrix product ``fn(*args)`` runs (traced, nothing computed)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr: Jaxpr) -> int:
    return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape  # [out, in / groups, *window] after the dimension numbers
        spec = eqn.params["dimension_numbers"].rhs_spec
        per_output = math.prod(rhs[d] for d in spec[1:])
        return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    inner = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
    if name == "scan":
        return eqn.params["length"] * sum(inner)
    if name == "cond":
        return max(inner, default=0)
    return sum(inner)


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item
