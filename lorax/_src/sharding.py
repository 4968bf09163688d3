"""Where a LoRA factor lives: derived from the sharding of its base weight."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from typing import Any

from lorax._src.paths import named_leaves
from lorax._src.weight import LoraWeight, Trainable, is_node


def factor_specs(lw: LoraWeight, w_spec: PartitionSpec) -> tuple[PartitionSpec, PartitionSpec]:
    """``a`` takes the spec of W's contracted axes, ``b`` that of its output axes; stack
    axes keep theirs and the rank axis is unsharded.

    >>> import jax.numpy as jnp, lorax
    >>> from jax.sharding import PartitionSpec as P
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> factor_specs(lw, P("data", "model"))
    (P('data', None), P(None, 'model'))
    """
    spec = tuple(w_spec) + (None,) * (len(lw.a_axes) + len(lw.b_axes) + len(lw.stack_axes) - len(w_spec))
    stack = [spec[i] for i in lw.stack_axes]
    return (PartitionSpec(*stack, *(spec[i] for i in lw.a_axes), None),
            PartitionSpec(*stack, None, *(spec[i] for i in lw.b_axes)))


def factor_shardings(lw: LoraWeight, w_sharding) -> tuple:
    """Shardings for ``a`` and ``b`` from W's; a non-named sharding is reused as is."""
    if isinstance(w_sharding, NamedSharding):
        a, b = factor_specs(lw, w_sharding.spec)
        return NamedSharding(w_sharding.mesh, a), NamedSharding(w_sharding.mesh, b)
    if w_sharding is not None and w_sharding.is_fully_replicated:
        return w_sharding, w_sharding
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return single, single


def _spec_of(leaf) -> PartitionSpec:
    sharding = getattr(leaf, "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()


def partition_specs(params: Any, base_specs: Any = None) -> Any:
    """The PartitionSpec tree of a LoRA tree, for ``jax.jit`` in/out shardings.

    Each `LoraWeight` becomes a LoraWeight of specs: ``w`` keeps its own, ``a`` and ``b``
    follow `factor_specs`. Base specs come from ``base_specs`` (a spec tree of the plain
    model, e.g. ``flax.linen.get_partition_spec(variables)``; matched by path) or else from
    each array's own ``NamedSharding``. ``split`` the result like the params.

    >>> import jax.numpy as jnp, lorax
    >>> from jax.sharding import PartitionSpec as P
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> partition_specs({"w": lw}, {"w": P(None, "model")})["w"].b
    P(None, 'model')
    """
    given = dict(named_leaves(base_specs)) if base_specs is not None else {}
    names = iter(name for name, _ in named_leaves(params))

    def spec(leaf):
        name = next(names)
        if isinstance(leaf, LoraWeight):
            w_spec = given.get(name, _spec_of(leaf.w))
            a, b = factor_specs(leaf, w_spec)
            return dataclasses.replace(leaf, w=w_spec, a=a, b=b)
        if isinstance(leaf, Trainable):
            return Trainable(given.get(name, _spec_of(leaf.value)))
        return given.get(name, _spec_of(leaf))

    return jax.tree.map(spec, params, is_leaf=is_node)


def place_factors(lw: LoraWeight) -> LoraWeight:
    """Put ``a`` and ``b`` where `factor_specs` says, when ``w`` is a sharded concrete array."""
    sharding = getattr(lw.w, "sharding", None)
    if not isinstance(sharding, NamedSharding) or isinstance(lw.w, jax.core.Tracer):
        return lw
    a_sharding, b_sharding = factor_shardings(lw, sharding)
    return dataclasses.replace(lw, a=jax.device_put(lw.a, a_sharding), b=jax.device_put(lw.b, b_sharding))
