"""Several named LoRA adapters of one frozen weight, and the product that picks one per example.

A `LoraBank` stacks the factors of ``n`` adapters along an adapters axis (smaller ranks padded
with zeros, which changes no product) and holds each adapter's scale as an array, so adapters
of the same shapes are ordinary ``jit`` arguments. Its ``index`` (set by
`lorax.adapters.route`) says which adapter each example uses: a scalar for the whole batch,
or one entry per example along the activation's leading axis; an index outside
``[0, n)`` (`BASE`, -1) selects the base alone.

With a per-example index, the dot product gathers each example's factors (``[batch, in, r]``
and ``[batch, r, out]``) and runs the low-rank term as one batched product: no loop over
adapters, whatever the mix. With a scalar index, one adapter's factors are sliced out and
the product is LoRA's own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src import compat
from lorax._src.kinds.adapter import ADAPTERS, RANK, frozen_field, register_kind, static_field
from lorax._src.kinds.lora import LoraWeight, LowRank
from lorax._src.tracing.rules import products
from lorax._src.tracing.table import apply

BASE = -1
"""The adapter index that selects the base weight alone (-1): in `lorax.adapters.route`'s
``index`` and what `lorax.adapters.index_of` gives for None.

>>> import jax, jax.numpy as jnp, lorax
>>> fn = lambda p, x: x @ p["w"]
>>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
>>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, x)
>>> lp["w"] = lp["w"].replace(b=jnp.ones((2, 3)))  # a trained adapter
>>> params = lorax.adapters.bank({"math": lp})
>>> out = lorax.lora(fn)(lorax.adapters.route(params, jnp.array([0, lorax.adapters.BASE])), x)
>>> bool(jnp.allclose(out[1], fn(base, x)[1])), bool(jnp.allclose(out[0], fn(base, x)[0]))
(True, False)
"""


@register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class LoraBank(LowRank):
    """A frozen weight ``w`` with ``n`` named low-rank updates ``scales[i] * a[i] @ b[i]``.

    ``a.shape == (*stack, n, *a_axes, r)`` and ``b.shape == (*stack, n, r, *b_axes)`` with
    ``r`` the largest rank; ``scales`` and ``ranks`` are ``[n]`` arrays (adapter ``i`` uses the
    first ``ranks[i]`` of the ``r``; rank 0: this weight is not adapted by it), so banks that
    differ in scales or ranks but not in shapes share a compiled program; ``index`` is None (not
    routed), a scalar, or one entry per example. Build banks with `lorax.adapters`
    (`lorax.adapters.bank`, `lorax.adapters.route`).

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      a: the trained down-projections, ``(*stack, n, *a_axes, r)``.
      b: the trained up-projections, ``(*stack, n, r, *b_axes)``.
      scales: each adapter's scale, ``[n]`` (frozen).
      ranks: each adapter's rank, ``[n]`` int (frozen); 0 where that adapter leaves ``w`` alone.
      index: which adapter each example uses: None (not routed), a scalar, or ``[batch]``
        ints; `lorax.adapters.BASE` (-1) selects the base alone.
      names: the adapters' names, in index order (keyword-only).
      a_axes: W's contracted (input) axes (keyword-only, as the fields after it).
      b_axes: W's output axes.
      stack_axes: W's axes of stacked layers.
      dropout: the rate applied to the adapters' input.

    >>> import jax.numpy as jnp, lorax
    >>> bank = lorax.LoraBank(jnp.zeros((2, 2)), jnp.ones((2, 2, 1)), jnp.ones((2, 1, 2)),
    ...                       jnp.array([1.0, 3.0]), jnp.array([1, 1]), names=("x", "y"))
    >>> lorax.merge(bank.replace(index=jnp.array(1))).tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """

    kind = "lora_bank"
    several = True
    factor_axes = (ADAPTERS,)

    scales: jax.Array = frozen_field()
    ranks: jax.Array = frozen_field()
    index: jax.Array | None = frozen_field(default=None)
    _: dataclasses.KW_ONLY
    names: tuple[str, ...] = static_field(())

    def axis_sizes(self, rank: int) -> dict[str, int]:
        return {RANK: rank, ADAPTERS: len(self.names)}

    def check(self, path: str = "") -> None:
        super().check(path)
        where = f"LoraBank at {path!r}" if path else "LoraBank"
        n = len(self.names)
        concrete = not compat.is_tracer(self.ranks) and jnp.shape(self.ranks) == (n,)
        if jnp.shape(self.ranks) != (n,) or jnp.shape(self.scales) != (n,) or \
                concrete and any(not 0 <= r <= self.rank for r in self.adapter_ranks):
            raise ValueError(f"{where}: {n} names {self.names} need ranks and scales of shape ({n},), each rank at "
                             f"most the factors' {self.rank}; got ranks {self.ranks}, scales {jnp.shape(self.scales)}.")
        if self.index is not None and jnp.ndim(self.index) > 1:
            raise ValueError(f"{where}: index has shape {jnp.shape(self.index)}; expected a scalar or [batch].")

    @property
    def adapter_ranks(self) -> tuple[int, ...]:
        """Each adapter's own rank, as ints (outside ``jit``).

        >>> import jax.numpy as jnp, lorax
        >>> bank = lorax.LoraBank(jnp.zeros((2, 2)), jnp.ones((2, 2, 2)), jnp.ones((2, 2, 2)),
        ...                       jnp.array([1.0, 1.0]), jnp.array([2, 1]), names=("x", "y"))
        >>> bank.adapter_ranks
        (2, 1)
        """
        if compat.is_tracer(self.ranks):
            raise TypeError(f"the ranks of the LoraBank of adapters {self.names} are traced (a call under jit?); "
                            "select, combine and save adapters outside jit.")
        return tuple(int(r) for r in np.asarray(self.ranks))

    @property
    def adapter_axis(self) -> int:
        """The adapters axis of ``a`` and ``b`` (after the stack axes)."""
        return self.axis("a", ADAPTERS)

    def chosen(self, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(a, b, scale)`` of adapter ``index`` (an int array of any shape, whose axes lead
        the results); an index outside ``[0, n)`` gets scale 0: the base alone."""
        n = len(self.names)
        valid = (index >= 0) & (index < n)
        safe = jnp.where(valid, index, 0)
        take = lambda x: jnp.moveaxis(jnp.take(x, safe, axis=self.adapter_axis),  # noqa: E731
                                      range(self.adapter_axis, self.adapter_axis + safe.ndim), range(safe.ndim))
        scale = jnp.where(valid, jnp.take(self.scales, safe), 0.0).astype(self.scales.dtype)
        return take(self.a), take(self.b), scale

    def as_lora(self, index: jax.Array) -> LoraWeight:
        """Adapter ``index`` (a scalar, maybe traced) as a `LoraWeight` of the padded rank,
        its scale folded into ``b``."""
        a, b, scale = self.chosen(jnp.asarray(index))
        return LoraWeight(self.w, a, (b * scale).astype(b.dtype), a_axes=self.a_axes, b_axes=self.b_axes,
                          stack_axes=self.stack_axes, dropout=self.dropout)

    def routed(self) -> LoraWeight:
        """The one adapter the bank is routed to (a scalar ``index``), as `as_lora` gives it."""
        if self.index is None or jnp.ndim(self.index) != 0:
            state = "is not routed" if self.index is None else f"is routed per example {jnp.shape(self.index)}"
            raise ValueError(f"a LoraBank of adapters {self.names} {state}, so it stands for no single weight; "
                             "merge lorax.adapters.select(params, name), or route it to one adapter.")
        return self.as_lora(self.index)

    def low_rank(self) -> jax.Array:
        """The routed adapter's ``scale * a @ b``, laid out like ``w``."""
        return self.routed().low_rank()

    def merged(self) -> jax.Array:
        return self.routed().merged()


@apply("dot_general", adapter=LoraBank)
def _dot(eqn, invals, ctx):
    """The routed bank's product: one adapter's LoRA product for a scalar index; for an
    index per example, each example's factors gathered, then one batched product."""
    d = products.dot_letters(eqn, invals)
    if d is None:
        return None
    bank: LoraBank = d.t.weight
    if bank.index is None:
        raise ValueError(f"lorax.lora: {d.t.label!r} is a LoraBank of adapters {bank.names} that is not routed; "
                         "call lorax.adapters.route(params, index) (or select one adapter) first.")
    if jnp.ndim(bank.index) == 0:
        single = d.t.with_weight(bank.as_lora(bank.index))
        parts = products.dot_parts(eqn, [single if v is d.t else v for v in invals], ctx)
        return None if parts is None else [parts.base + parts.update]
    example = d.x_sub[0]
    batch = jnp.shape(bank.index)[0]
    if example not in d.out or example in d.w_sub or jnp.shape(d.x)[0] != batch:
        raise ValueError(f"lorax.lora: {d.t.label!r} is routed per example (index of {batch}), but the "
                         f"activation it multiplies has shape {jnp.shape(d.x)}: its leading axis must be the "
                         f"{batch} examples and stay in the output. Route with a scalar index, or keep the batch "
                         "axis first.")
    a, b, scale = bank.chosen(bank.index)
    factors = {"a": a.astype(bank.w.dtype), "b": b.astype(bank.w.dtype)}
    (f1_sub, f1), (f2_sub, f2) = ((sub, factors[name]) for sub, name in d.factors)
    keep = "".join(c for c in dict.fromkeys(d.x_sub + f1_sub) if c in d.out or c in f2_sub)
    x = d.t.adapter_input(d.x, ctx.next_use())
    y = jnp.einsum(f"{d.x_sub},{example}{f1_sub}->{keep}", x, f1)
    y = y * scale.astype(y.dtype).reshape((batch,) + (1,) * (y.ndim - 1))
    update = jnp.einsum(f"{keep},{example}{f2_sub}->{d.out}", y, f2)
    base = d.base(eqn, bank.w, ctx.narrow)
    return [base + update.astype(base.dtype)]
