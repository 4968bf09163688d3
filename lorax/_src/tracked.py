"""The value a LoRA weight takes while `lorax.lora` evaluates a function."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorax._src.weight import LoraWeight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tracked:
    """A LoraWeight (possibly transposed, cast, or sliced from a stack) flowing through
    a jaxpr, with the dropout key of its adapter and the path it came from.

    ``weight.w`` is already gradient-stopped: `lorax.lora` stops it once, where the
    weight enters. Stopping it again inside a scan body would make JAX save each slice
    as a residual, a stacked copy of W per step."""

    weight: LoraWeight
    key: jax.Array | None
    label: str = dataclasses.field(metadata=dict(static=True))

    def materialize(self) -> jax.Array:
        """``w + scale * a @ b``: the dense weight, for uses with no factored rule."""
        w = self.weight.w
        return w + self.weight.delta().astype(w.dtype)

    def factors(self, dtype) -> tuple[jax.Array, jax.Array]:
        return self.weight.a.astype(dtype), self.weight.b.astype(dtype)

    def adapter_input(self, x: jax.Array, use: int) -> jax.Array:
        """``x`` with inverted dropout at the adapter's rate when a key was given."""
        rate = self.weight.dropout
        if self.key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, use), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    def with_weight(self, **changes) -> "Tracked":
        return dataclasses.replace(self, weight=dataclasses.replace(self.weight, **changes))


def unwrap(value):
    """A plain array for any value: Tracked weights are materialized."""
    return value.materialize() if isinstance(value, Tracked) else value
