"""Where an adapter's trained arrays live: derived from the sharding of its base weight."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lorax._src import compat
from lorax._src.bases.quantized import is_frozen_base, stored
from lorax._src.kinds.adapter import Adapter
from lorax._src.paths import named_leaves
from lorax._src.trainable import Trainable, is_node


def factor_specs(lw: Adapter, w_spec: PartitionSpec) -> dict[str, PartitionSpec]:
    """Each trained array takes the spec of the W axis behind each of its axes (`layout`):
    ``a`` that of W's contracted axes, ``b`` that of its output axes, stack axes keep theirs
    and the rank axis is unsharded.

    >>> import jax.numpy as jnp, lorax
    >>> from jax.sharding import PartitionSpec as P
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> factor_specs(lw, P("data", "model"))
    {'a': P('data', None), 'b': P(None, 'model')}
    """
    spec = tuple(w_spec) + (None,) * (len(lw.shape) - len(w_spec))
    return {name: PartitionSpec(*(spec[e] if isinstance(e, int) else None for e in entries))
            for name, entries in lw.layout().items()}


def factor_shardings(lw: Adapter, w_sharding) -> dict[str, Any]:
    """Shardings for the trained arrays from W's; a non-named sharding is reused as is."""
    if isinstance(w_sharding, NamedSharding):
        return {name: NamedSharding(w_sharding.mesh, spec) for name, spec in factor_specs(lw, w_sharding.spec).items()}
    if w_sharding is not None and w_sharding.is_fully_replicated:
        return {name: w_sharding for name in lw.trained_fields()}
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {name: single for name in lw.trained_fields()}


def partition_specs(params: Any, base_specs: Any = None) -> Any:
    """The PartitionSpec tree of a LoRA tree, for ``jax.jit`` in/out shardings.

    Each adapter becomes one of specs: ``w`` keeps its own, and each trained array takes the
    spec of the W axis behind each of its axes (``a`` that of W's contracted axes, ``b`` that
    of its output axes, stack axes keep theirs, the rank axis is unsharded); arrays adapters
    share (VeRA's projections) are replicated. Base specs come
    from ``base_specs`` (a spec tree of the plain model, e.g.
    ``flax.linen.get_partition_spec(variables)``; matched by path) or else from each array's
    own ``NamedSharding``. `lorax.split` the result like the params.

    >>> import jax.numpy as jnp, lorax
    >>> from jax.sharding import PartitionSpec as P
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> specs = lorax.partition_specs({"w": lw}, {"w": P("data", "model")})["w"]
    >>> specs.w, specs.a, specs.b
    (P('data', 'model'), P('data', None), P(None, 'model'))
    """
    given = dict(named_leaves(base_specs)) if base_specs is not None else {}
    names = iter(name for name, _ in named_leaves(params))

    def spec(leaf):
        name = next(names)
        if isinstance(leaf, Adapter):
            w_spec = given.get(name, _spec_of(leaf.w))
            shared = {n: PartitionSpec() for n in leaf.shared_fields() if getattr(leaf, n) is not None}
            return leaf.replace(w=_base_spec(leaf.w, w_spec), **factor_specs(leaf, w_spec), **shared)
        if is_frozen_base(leaf):
            return _base_spec(leaf, given.get(name, _spec_of(leaf)))
        if isinstance(leaf, Trainable):
            return Trainable(given.get(name, _spec_of(leaf.value)))
        return given.get(name, _spec_of(leaf))

    return jax.tree.map(spec, params, is_leaf=is_node)


def _base_spec(w: Any, spec: PartitionSpec) -> Any:
    """A quantized weight's codes, scales and offsets keep the weight's axes, so each takes
    the weight's spec (the block axis sharded too: its shards hold whole blocks when the
    blocks per shard divide evenly)."""
    if not is_frozen_base(w):
        return spec
    return jax.tree.map(lambda x: spec, w)


def _spec_of(leaf) -> PartitionSpec:
    sharding = getattr(stored(leaf), "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()


def place_factors(lw: Adapter) -> Adapter:
    """Put the trained arrays where `factor_specs` says, when ``w`` is a sharded concrete array."""
    sharding = getattr(stored(lw.w), "sharding", None)
    if not isinstance(sharding, NamedSharding) or compat.is_tracer(lw.w):
        return lw
    shardings = factor_shardings(lw, sharding)
    return lw.replace(**{name: jax.device_put(x, shardings[name]) for name, x in lw.trained().items()})
