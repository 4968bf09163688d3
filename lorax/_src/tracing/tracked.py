"""The value an adapted weight takes while `lorax.lora` evaluates a function."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax._src.kinds.adapter import Adapter


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tracked:
    """An adapter (possibly transposed, cast, or sliced from a stack) flowing through a
    jaxpr, with the dropout key of its adapter and the path it came from.

    ``weight.w`` is already gradient-stopped: `lorax.lora` stops it once, where the
    weight enters. Stopping it again inside a scan body would make JAX save each slice
    as a residual, a stacked copy of W per step. Rule handlers (`lorax.extend.apply`) receive
    one in place of each adapted input; `is_tracked` tells them apart from plain values.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=0.5)
    >>> value = Tracked(lw, None, "w")
    >>> is_tracked(value), value.materialize().shape
    (True, (4, 3))
    """

    weight: Adapter
    key: jax.Array | None
    label: str = dataclasses.field(metadata=dict(static=True))

    def materialize(self) -> jax.Array:
        """The dense weight, for uses with no factored rule."""
        try:
            return self.weight.merged()
        except ValueError as err:
            raise ValueError(f"lorax.lora: {self.label!r} is used where it cannot be factored: {err}") from None

    def adapter_input(self, x: jax.Array, use: int) -> jax.Array:
        """``x`` with inverted dropout at the adapter's rate when a key was given."""
        rate = self.weight.dropout
        if self.key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, use), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    def with_weight(self, weight: Adapter) -> Tracked:
        return dataclasses.replace(self, weight=weight)

    def replace(self, **changes) -> Tracked:
        return dataclasses.replace(self, **changes)


def is_tracked(value: Any) -> bool:
    """Whether a rule's input is an adapted weight (a `Tracked`) rather than a plain value.

    >>> import jax.numpy as jnp
    >>> is_tracked(jnp.ones(2))
    False
    """
    return isinstance(value, Tracked)


def unwrap(value):
    """A plain array for any value: Tracked weights are materialized."""
    return value.materialize() if is_tracked(value) else value
