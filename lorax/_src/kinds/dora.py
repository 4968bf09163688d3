"""DoRA (Liu et al. 2024): ``W' = m · (W + s·A·B) / ‖W + s·A·B‖``, one magnitude per output unit.

The norm is taken over W's contracted axes and, as the paper suggests and PEFT does, treated
as a constant in the backward pass. Nothing of W's size is built per use: the output is the
frozen product plus the low-rank term, rescaled per output unit by ``m / ‖·‖``, and the norm
comes from ``‖W‖²``, ``Aᵀ·W`` (rank × outputs) and ``AᵀA`` (rank × rank) terms.

Factored for dot products (dense and multi-axis einsum kernels, stacked layers); `lorax.init`
refuses DoRA on other uses (convolutions, embedding lookups).
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp
from jax import lax

from lorax._src.bases.quantized import dense
from lorax._src.kinds.adapter import register_kind, trained_field
from lorax._src.kinds.initializers import low_rank_init
from lorax._src.kinds.lora import LowRank
from lorax._src.tracing.rules import products
from lorax._src.tracing.table import apply
from lorax._src.tracing.tracked import is_tracked


@register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class DoraWeight(LowRank):
    """A frozen weight ``w`` with a low-rank direction update ``scale * a @ b`` and a trained
    magnitude ``m`` per output unit (DoRA, Liu et al. 2024): the weight it stands for is
    ``m · (W + scale·a·b) / ‖W + scale·a·b‖``, the norm taken over W's contracted axes.
    `lorax.init` builds these with ``LoraConfig(use_dora=True)``.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      a: the trained down-projection, ``(*stack, *a_axes, rank)``.
      b: the trained up-projection, ``(*stack, rank, *b_axes)``; zero at initialisation.
      m: the trained magnitude per output unit, ``(*stack, *b_axes)``; W's column norms at
        initialisation.
      scale: the update's scale, as for `LoraWeight`.
      a_axes: W's contracted (input) axes.
      b_axes: W's output axes.
      stack_axes: W's axes of stacked layers: one adapter per layer.
      dropout: the rate applied to the adapter's input.
      init: how the factors started (a `LoraConfig` ``init``).

    >>> import jax.numpy as jnp, lorax
    >>> w = jnp.array([[3.0, 0.0], [4.0, 1.0]])
    >>> dw = lorax.DoraWeight(w, jnp.zeros((2, 1)), jnp.zeros((1, 2)), jnp.array([10.0, 1.0]))
    >>> lorax.merge(dw).tolist()  # each column rescaled to norm m
    [[6.0, 0.0], [8.0, 1.0]]
    """

    kind = "dora"

    m: jax.Array = trained_field(group="b")  # PEFT's LoRA+ trains 1-D parameters at B's rate

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        return {**super().layout(), "m": (*self.stack_axes, *self.b_axes)}

    def column_norm(self) -> jax.Array:
        """``‖W + s·A·B‖`` over W's contracted axes, shaped like ``m``, in float32, with no
        gradient. Built from ``‖W‖²``, ``Aᵀ·W`` and ``AᵀA``: nothing of W's size but W itself."""
        subs = self.subscripts()
        w, a, b = (lax.stop_gradient(x).astype(jnp.float32) for x in (dense(self.w), self.a, self.b))
        other = string.ascii_letters[len(subs["w"]) + 1]  # a second rank letter
        rank = subs["a"][-1]
        a2, b2 = subs["a"].replace(rank, other), subs["b"].replace(rank, other)
        pairs = subs["b"][:-len(self.b_axes)] + other  # (stack, rank, rank')
        # rank-sized products then sums: as einsums of two operands they are batched dots of
        # short vectors, which XLA:CPU runs several times slower (‖W‖² stays one: W * W would be
        # a W-sized array in the program)
        ww = jnp.einsum(f"{subs['w']},{subs['w']}->{subs['m']}", w, w)
        atw = jnp.einsum(f"{subs['a']},{subs['w']}->{subs['b']}", a, w)
        cross = jnp.einsum(f"{subs['b']}->{subs['m']}", atw * b)
        ata = jnp.einsum(f"{subs['a']},{a2}->{pairs}", a, a)
        quad = jnp.einsum(f"{subs['b']}->{subs['m']}", jnp.einsum(f"{pairs},{b2}->{subs['b']}", ata, b) * b)
        s = self.scale
        return jnp.sqrt(jnp.maximum(ww + 2 * s * cross + s * s * quad, 0.0))

    def magnitude_scale(self) -> jax.Array:
        """``m / ‖W + s·A·B‖`` (the norm a constant), shaped like ``m``. An all-zero column
        (norm 0) has an all-zero output whatever its factor, so it takes ``m`` itself, not NaN."""
        norm = self.column_norm()
        return self.m.astype(jnp.float32) / jnp.where(norm > 0, norm, 1.0)

    def merged(self) -> jax.Array:
        subs = self.subscripts()
        g = _broadcast(self.magnitude_scale(), subs["m"], subs["w"])
        w = dense(self.w)
        direction = w + self.low_rank().astype(w.dtype)
        return (g * direction).astype(w.dtype)

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> DoraWeight:
        """As `LoraWeight.create`, with ``m`` the column norms of the initial weight."""
        dtype = spec.dtype_for(w.dtype)
        base, a, b = low_rank_init(key, spec.init, w, use.a_axes, use.b_axes, use.stack_axes,
                                   spec.rank, spec.scale, dtype)
        stack = len(use.stack_axes)
        m = jnp.ones(b.shape[:stack] + b.shape[stack + 1:], dtype)
        shell = cls(base, a, b, m, scale=spec.scale, a_axes=use.a_axes, b_axes=use.b_axes,
                    stack_axes=use.stack_axes, dropout=spec.dropout, init=spec.init)
        return shell.replace(m=shell.column_norm().astype(dtype))


def _broadcast(g: jax.Array, g_sub: str, target: str) -> jax.Array:
    """``g`` (axes ``g_sub``) reordered and padded with unit axes to broadcast over ``target``."""
    order = sorted(g_sub, key=target.index)
    g = jnp.transpose(g, [g_sub.index(c) for c in order])
    return g.reshape([g.shape[order.index(c)] if c in g_sub else 1 for c in target])


@apply("dot_general", adapter=DoraWeight)
def _dot(eqn, invals, ctx):
    """``(m / ‖W + s·A·B‖) · (x·W + s·(x·A)·B)``, rescaled per output unit."""
    parts = products.dot_parts(eqn, invals, ctx)
    if parts is None:
        return None
    dw = (invals[0] if is_tracked(invals[0]) else invals[1]).weight
    m_sub = "".join(parts.w_sub[i] for i in (*dw.stack_axes, *dw.b_axes))
    if any(c not in parts.out for c in m_sub):  # output units contracted away (a tied head)
        return None
    g = _broadcast(dw.magnitude_scale(), m_sub, parts.out).astype(parts.base.dtype)
    return [g * (parts.base + parts.update)]
