"""`lorax.optimizer`: an optax transformation that trains adapters only (LoRA+ optional)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax._src.kinds.adapter import Adapter
from lorax._src.trainable import Trainable, is_node
from lorax._src.validate import real

TRAIN, TRAIN_B, FROZEN = "lora_trainable", "lora_trainable_b", "lora_frozen"


def labels(params: Any, b_group: str = TRAIN) -> Any:
    """The tree of ``params`` (whole, or either half of `lorax.split`) with each leaf
    labelled ``TRAIN``, ``b_group`` (the trained arrays of LoRA+'s B group) or ``FROZEN``."""

    def label(x):
        if isinstance(x, Adapter):
            groups = {"a": TRAIN, "b": b_group}
            return x.replace(**{n: None if getattr(x, n) is None else FROZEN for n in x.frozen_fields()},
                             **{n: None if getattr(x, n) is None else groups[x.group(n)]
                                for n in x.trained_fields()})
        return Trainable(TRAIN) if isinstance(x, Trainable) else FROZEN

    return jax.tree.map(label, params, is_leaf=is_node)


def freeze() -> optax.GradientTransformation:
    """Updates of ``-0.0``: ``p + (-0.0)`` is ``p`` bit for bit, negative zeros included
    (``optax.set_to_zero`` gives ``+0.0``, which turns ``-0.0`` into ``+0.0``)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda g: jnp.full_like(g, -0.0), updates))


def optimizer(tx: optax.GradientTransformation, *, b_lr_ratio: float | None = None) -> optax.GradientTransformation:
    """Wrap ``tx`` to update adapters (and `Trainable` leaves) only.

    Gradients may be taken with respect to the whole tree; frozen leaves get no optimizer
    state and stay bit-identical. (``optax.masked`` alone would pass their raw gradient
    through.) For the cheapest step, differentiate ``lorax.split(params)[0]`` instead and
    return only what changed; the wrapper works on that half too.

    ``b_lr_ratio=λ`` is LoRA+ (Hayou et al. 2024): ``b`` (and DoRA's magnitude, as PEFT
    does) get ``λ×`` the updates of ``a``, from their own copy of ``tx``. For SGD and for
    Adam-like optimizers (whose update is ``lr × a normalised step``, weight decay included)
    that is exactly ``λ×`` the learning rate.

    >>> import jax, jax.numpy as jnp, optax, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> tx = lorax.optimizer(optax.adam(1e-2))
    >>> state = tx.init({"w": lw})
    >>> len(jax.tree.leaves(state))  # adam's count, mu and nu for a and b only
    5
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"lorax.optimizer: tx must be an optax.GradientTransformation (optax.adam(1e-3), ...), "
                        f"got {type(tx).__name__}.")
    if b_lr_ratio is None:
        return optax.partition({TRAIN: tx, FROZEN: freeze()}, labels)
    ratio = real(b_lr_ratio, "lorax.optimizer: b_lr_ratio")
    if not ratio > 0:
        raise ValueError(f"lorax.optimizer: b_lr_ratio must be a finite number > 0, got {b_lr_ratio!r}.")
    transforms: dict[Hashable, optax.GradientTransformation] = {
        TRAIN: tx, TRAIN_B: optax.chain(tx, optax.scale(ratio)), FROZEN: freeze()}
    return optax.partition(transforms, lambda params: labels(params, TRAIN_B))
