"""`lorax.optimizer`: an optax transformation that trains adapters only."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax._src.weight import LoraWeight, Trainable, is_node

TRAIN, FROZEN = "lora_trainable", "lora_frozen"


def labels(params: Any) -> Any:
    """The tree of ``params`` with each leaf labelled ``TRAIN`` or ``FROZEN``."""

    def label(x):
        if isinstance(x, LoraWeight):
            return dataclasses.replace(x, w=FROZEN, a=TRAIN, b=TRAIN)
        return Trainable(TRAIN) if isinstance(x, Trainable) else FROZEN

    return jax.tree.map(label, params, is_leaf=is_node)


def freeze() -> optax.GradientTransformation:
    """Updates of ``-0.0``: ``p + (-0.0)`` is ``p`` bit for bit, negative zeros included
    (``optax.set_to_zero`` gives ``+0.0``, which turns ``-0.0`` into ``+0.0``)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda g: jnp.full_like(g, -0.0), updates))


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap ``tx`` to update adapters (and `Trainable` leaves) only.

    Gradients may be taken with respect to the whole tree; frozen leaves get no optimizer
    state and stay bit-identical. (``optax.masked`` alone would pass their raw gradient
    through.) For the cheapest step, differentiate ``lorax.split(params)[0]`` instead and
    return only what changed.

    >>> import jax, jax.numpy as jnp, optax, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> tx = lorax.optimizer(optax.adam(1e-2))
    >>> state = tx.init({"w": lw})
    >>> len(jax.tree.leaves(state))  # adam's count, mu and nu for a and b only
    5
    """
    transforms = {TRAIN: tx, FROZEN: freeze()}
    partition = getattr(optax, "partition", None) or optax.multi_transform
    return partition(transforms, labels)
