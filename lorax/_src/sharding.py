"""Where a LoRA factor lives: derived from the sharding of its base weight."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lorax._src.weight import LoraWeight


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
