"""Plain LoRA (Hu et al. 2021): ``W + s·A·B``, computed as ``x·W + s·(x·A)·B``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from lorax._src.bases.quantized import dense
from lorax._src.kinds.adapter import RANK, Adapter, register_kind, trained_field
from lorax._src.kinds.initializers import low_rank_init
from lorax._src.tracing.rules import products
from lorax._src.tracing.table import apply


@dataclasses.dataclass(frozen=True, repr=False)
class LowRank(Adapter):
    """The LoRA family's base: a frozen ``w`` and trained factors ``a`` (W's contracted axes,
    then the rank) and ``b`` (the rank, then W's output axes), one pair per stacked layer and,
    after the stack axes, per entry of the kind's `factor_axes` (`lorax.LoraBank`: one pair per
    adapter). LoRA, DoRA and banks build on it; `lorax.extend.dot_parts` computes the factored
    product of any subclass from its `layout`, the way ``w``'s letters meet the rank's.

    >>> import jax.numpy as jnp, lorax
    >>> from lorax import extend
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    >>> isinstance(lw, extend.LowRank), lw.layout()
    (True, {'a': (0, 'rank'), 'b': ('rank', 1)})
    """

    a: jax.Array = trained_field(group="a")
    b: jax.Array = trained_field(group="b")
    factor_axes: ClassVar[tuple[str, ...]] = ()  # named axes between the stack axes and W's

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        lead = (*self.stack_axes, *self.factor_axes)
        return {"a": (*lead, *self.a_axes, RANK), "b": (*lead, RANK, *self.b_axes)}

    def first_ranks(self, rank: int) -> tuple[jax.Array, jax.Array]:
        """``a`` and ``b`` cut to their first ``rank`` ranks, each along its own rank axis.

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
        >>> [x.shape for x in lw.first_ranks(1)]
        [(4, 1), (1, 3)]
        """
        a, b = (lax.slice_in_dim(getattr(self, n), 0, rank, axis=self.axis(n, RANK)) for n in ("a", "b"))
        return a, b

    def low_rank(self) -> jax.Array:
        """``scale * a @ b`` laid out like ``w`` (in the factors' dtype).

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=0.5)
        >>> lw.low_rank().tolist()
        [[0.5, 0.5], [0.5, 0.5]]
        """
        subs = self.subscripts()
        return jnp.einsum(f"{subs['a']},{subs['b']}->{subs['w']}", self.a, self.b) * self.scale


@register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class LoraWeight(LowRank):
    """A frozen weight ``w`` with a trainable low-rank update ``scale * a @ b``.

    ``a`` holds W's *contracted* axes (``a_axes``) and ``b`` its *output* axes
    (``b_axes``); axes of stacked layers (``stack_axes``, e.g. from ``nn.scan``)
    lead both factors, giving one independent adapter per layer:
    ``a.shape == (*stack, *a_axes, rank)`` and ``b.shape == (*stack, rank, *b_axes)``.
    Axis numbers index ``w``. `lorax.init` builds these; build one by hand to import factors.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      a: the trained down-projection, ``(*stack, *a_axes, rank)``.
      b: the trained up-projection, ``(*stack, rank, *b_axes)``; zero at initialisation.
      scale: the update's scale: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
      a_axes: W's contracted (input) axes.
      b_axes: W's output axes.
      stack_axes: W's axes of stacked layers (``nn.scan``): one adapter per layer.
      dropout: the rate applied to the adapter's input (on when `lorax.lora` gets ``rng``).
      init: how the factors started (a `LoraConfig` ``init``); after ``"pissa"`` or
        ``"olora"`` the frozen ``w`` is the residual ``W - scale·a₀·b₀``.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
    ...                       scale=0.5, a_axes=(0,), b_axes=(1,))
    >>> lw.rank, lorax.merge(lw).shape
    (2, (4, 3))
    """

    kind = "lora"

    def delta(self) -> jax.Array:
        return self.low_rank()

    def merged(self) -> jax.Array:
        w = dense(self.w)
        return (w + self.low_rank().astype(w.dtype)).astype(w.dtype)

    def unmerged(self, merged: jax.Array, path: str = "") -> jax.Array:
        return (merged - self.low_rank().astype(merged.dtype)).astype(merged.dtype)

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> LoraWeight:
        base, a, b = low_rank_init(key, spec.init, w, use.a_axes, use.b_axes, use.stack_axes,
                                   spec.rank, spec.scale, spec.dtype_for(w.dtype))
        return cls(base, a, b, scale=spec.scale, a_axes=use.a_axes, b_axes=use.b_axes,
                   stack_axes=use.stack_axes, dropout=spec.dropout, init=spec.init)


@apply("dot_general", adapter=LoraWeight)
def _dot(eqn, invals, ctx):
    parts = products.dot_parts(eqn, invals, ctx)
    return None if parts is None else [parts.base + parts.update]


@apply("conv_general_dilated", adapter=LoraWeight)
def _conv(eqn, invals, ctx):
    """A window convolution to ``rank`` channels, then ``b`` as a 1×1 convolution."""
    return _then_b(products.conv_parts(eqn, invals, ctx), invals, 1)


@apply("gather", adapter=LoraWeight)
def _gather(eqn, invals, ctx):
    """An embedding lookup: the rows of ``a``, then ``b``."""
    return _then_b(products.gather_parts(eqn, invals, ctx), invals, 0)


def _then_b(parts, invals, position: int):
    """The frozen product plus the rank-wide product ``y`` taken through ``s·b``."""
    if parts is None:
        return None
    base, y, axis = parts
    lw = invals[position].weight
    return [base + products.apply_b(y, axis, lw.b, lw.scale).astype(base.dtype)]
