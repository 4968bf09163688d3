"""LoHa (Hyeon-Woo et al. 2022, LyCORIS): ``W + s·(A₁·B₁) ⊙ (A₂·B₂)``, the Hadamard product of
two rank-r updates (rank up to r² for 4r trained vectors per unit), as PEFT's `LoHaConfig`.

Written only against `lorax.extend`. Factored by the face-splitting identity:
``x·((A₁B₁) ⊙ (A₂B₂)) = (x·(A₁ • A₂))·(B₁ ∗ B₂)``, with ``A₁ • A₂`` [in, r²] the row-wise
Kronecker product of the down factors and ``B₁ ∗ B₂`` [r², out] the column-wise one of the up
factors: a LoRA of rank r², so each use costs two thin products and two r²-wide factors, never
a weight-sized array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import extend

PEFT_KEYS = frozenset({"alpha", "alpha_pattern", "auto_mapping", "base_model_name_or_path", "exclude_modules",
                       "inference_mode", "init_weights", "layers_pattern", "layers_to_transform", "module_dropout",
                       "modules_to_save", "peft_type", "peft_version", "r", "rank_dropout", "rank_pattern",
                       "revision", "target_modules", "task_type", "use_effective_conv2d"})
PEFT_NAMES = {"b1": "hada_w1_a", "a1": "hada_w1_b", "b2": "hada_w2_a", "a2": "hada_w2_b"}  # each transposed


@extend.register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class LohaWeight(extend.Additive):
    """A frozen weight ``w`` with the update ``scale · (a1·b1) ⊙ (a2·b2)`` (LoHa). `lorax.init`
    builds these with ``LoraConfig(kind="loha", rank=r, alpha=...)``: ``a1``, ``b1`` and ``b2``
    uniform as PEFT's Kaiming initialisation, ``a2`` zero, so the model starts unchanged.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      a1, a2: the trained down factors, ``(*stack, *a_axes, rank)`` (PEFT's ``hada_w1_b``,
        ``hada_w2_b`` transposed).
      b1, b2: the trained up factors, ``(*stack, rank, *b_axes)`` (PEFT's ``hada_w1_a``,
        ``hada_w2_a`` transposed).
      scale: ``alpha / rank``.

    >>> import jax.numpy as jnp, lorax
    >>> one = jnp.ones((2, 1))
    >>> lw = lorax.LohaWeight(jnp.zeros((2, 2)), one, jnp.array([[1.0, 2.0]]), 3 * one, jnp.ones((1, 2)))
    >>> lorax.merge(lw).tolist()  # (a1·b1) ⊙ (a2·b2)
    [[3.0, 6.0], [3.0, 6.0]]
    """

    kind = "loha"

    a1: jax.Array = extend.trained_field(group="a")
    b1: jax.Array = extend.trained_field(group="b")
    a2: jax.Array = extend.trained_field(group="a")
    b2: jax.Array = extend.trained_field(group="b")

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        down = (*self.stack_axes, *self.a_axes, extend.RANK)
        up = (*self.stack_axes, extend.RANK, *self.b_axes)
        return {"a1": down, "b1": up, "a2": down, "b2": up}

    def _matrices(self) -> tuple[jax.Array, ...]:
        """``a1, b1, a2, b2`` as ``[*stack, fan_in, r]`` and ``[*stack, r, fan_out]`` matrices."""
        stack, r = self.a1.shape[: len(self.stack_axes)], self.rank
        return tuple(x.reshape(*stack, -1, r) if name[0] == "a" else x.reshape(*stack, r, -1)
                     for name, x in (("a1", self.a1), ("b1", self.b1), ("a2", self.a2), ("b2", self.b2)))

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(A₁ • A₂, B₁ ∗ B₂)``: ``[*stack, fan_in, r²]`` and ``[*stack, r², fan_out]``, the
        rank-r² LoRA factors of the update (without its scale)."""
        a1, b1, a2, b2 = self._matrices()
        down = (a1[..., :, None] * a2[..., None, :]).reshape(*a1.shape[:-1], -1)
        up = (b1[..., :, None, :] * b2[..., None, :, :]).reshape(*b1.shape[:-2], -1, b1.shape[-1])
        return down, up

    def delta(self) -> jax.Array:
        a1, b1, a2, b2 = self._matrices()
        return self.from_matrices((a1 @ b1) * (a2 @ b2) * self.scale)

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> LohaWeight:
        """PEFT's initialisation: Kaiming-uniform ``a1``, ``b1``, ``b2`` (bound ``1/√fan_in`` of
        the torch parameter: ``1/√in`` for ``a1``, ``1/√r`` for the up factors), zero ``a2``."""
        if spec.init != "kaiming_uniform":
            raise ValueError(f"lorax.init: the kind 'loha' ({spec.path!r}) starts as PEFT's LoHa; "
                             f"got init={spec.init!r}.")
        dtype = spec.dtype_for(w.dtype)
        stack = [w.shape[i] for i in use.stack_axes]
        ins, outs = [w.shape[i] for i in use.a_axes], [w.shape[i] for i in use.b_axes]
        k1, k2, k3 = jax.random.split(key, 3)
        uniform = lambda k, shape, fan: jax.random.uniform(  # noqa: E731
            k, shape, dtype, -1 / math.sqrt(fan), 1 / math.sqrt(fan))
        r = spec.rank
        return cls(w, uniform(k1, (*stack, *ins, r), math.prod(ins)), uniform(k2, (*stack, r, *outs), r),
                   jnp.zeros((*stack, *ins, r), dtype), uniform(k3, (*stack, r, *outs), r),
                   scale=spec.scale, a_axes=use.a_axes, b_axes=use.b_axes, stack_axes=use.stack_axes,
                   dropout=spec.dropout)


extend.apply("dot_general", adapter=LohaWeight)(extend.factors_dot)  # x·W + s·(x·(A₁ • A₂))·(B₁ ∗ B₂)


def _to_peft(node: LohaWeight, layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``hada_w*_a`` [out, r] and ``hada_w*_b`` [r, in]: the up and down factors as torch matrices."""
    r = node.rank
    matrix = {"a1": (-1, r), "a2": (-1, r), "b1": (r, -1), "b2": (r, -1)}
    return {PEFT_NAMES[n]: layer[n].reshape(matrix[n]).T for n in PEFT_NAMES}


def _from_peft(node: LohaWeight, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    shapes = node.layer_shapes()
    return {n: tensors[peft_name].T.reshape(shapes[n]) for n, peft_name in PEFT_NAMES.items()}


def _config(nodes: list[tuple[str, Any]]) -> dict[str, Any]:
    return {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True,
            "layers_to_transform": None, "layers_pattern": None}


LohaWeight.peft = extend.PeftFormat("LOHA", PEFT_KEYS, tuple(sorted(PEFT_NAMES.values())), _to_peft, _from_peft,
                                    _config)
