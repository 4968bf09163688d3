"""`Trainable`: a plain leaf trained fully, and what counts as a lorax node."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lorax._src import display
from lorax._src.bases.quantized import FROZEN_BASES
from lorax._src.kinds.adapter import Adapter


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a plain leaf as fully trainable (PEFT's ``modules_to_save``): a head, a bias, a norm.

    `lorax.init` wraps the leaves ``LoraConfig(trainable=...)`` names; `lorax.lora` passes the
    value to the model, `lorax.split` puts it in the trained half and `lorax.merge` unwraps it.

    Attributes:
      value: the array trained in full.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"] + p["bias"]
    >>> base = {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2, trainable="bias"), fn, base, jnp.ones((1, 4)))
    >>> type(lp["bias"]).__name__, lp["bias"].value.shape, lorax.merge(lp)["bias"].shape
    ('Trainable', (3,), (3,))
    """

    value: Any  # an array; a label or a PartitionSpec in the trees lorax derives from params

    def __repr__(self) -> str:
        return display.node_repr(self, kind="full")

    def __treescope_repr__(self, path, subtree_renderer):
        return display.node_treescope(self, path, subtree_renderer, kind="full")


def is_node(x: Any) -> bool:
    """True for the nodes lorax keeps whole in a tree: adapters, `Trainable` leaves and
    frozen bases that are not plain arrays (quantized weights, `lorax.Bf16Bits`)."""
    return isinstance(x, (Adapter, Trainable, *FROZEN_BASES))


def is_lorax_node(x: Any) -> bool:
    """True for the nodes `lorax.init` inserts: adapters and `Trainable` leaves."""
    return isinstance(x, (Adapter, Trainable))
