"""`lorax.explain`: what was adapted, how each use is computed, and the parameter budget."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lorax._src import display
from lorax._src.bases.quantized import QuantizedArray, is_frozen_base
from lorax._src.init import first_use, unfit, uses_of
from lorax._src.kinds.adapter import Adapter
from lorax._src.paths import named_leaves
from lorax._src.tracing import transform
from lorax._src.tracing.trace import flatten_call
from lorax._src.trainable import Trainable, is_node


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of an `Explanation`: an adapted, fully trained or quantized weight.

    Attributes:
      path: the weight's path (``"params/h_0/attn/query/kernel"``).
      shape: the weight's shape.
      rank: the adapter's rank (0 for a `Trainable` or a frozen quantized weight).
      scale: the adapter's scale (1.0 for a `Trainable`, 0.0 for a frozen quantized weight).
      params: the weight's trained parameters.
      how: how its uses were computed: ``"factored (dot_general)"`` (the primitives, factored),
        ``"materialized: <primitive>"`` (``W + s·a·b`` built for those uses), ``"trained fully"``,
        ``"dequantized per use (...)"`` or ``"unused"``; over a quantized base, ``" over nf4"``
        and the like follows.
      kind: the adapter kind (``"lora"``, ``"dora"``, ``"lora_bank"``), ``"trainable"`` or
        ``"frozen <format>"``.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, {"w": jnp.ones((4, 3))}, jnp.ones((1, 4)))
    >>> lorax.explain(fn, lp, jnp.ones((1, 4))).rows[0]
    Row(path='w', shape=(4, 3), rank=2, scale=1.0, params=14, how='factored (dot_general)', kind='lora')
    """

    path: str
    shape: tuple[int, ...]
    rank: int
    scale: float
    params: int
    how: str
    kind: str = "lora"


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `explain` found: one `Row` per adapted, fully trained or quantized weight, and the
    parameter budget. ``print`` it for a table; in a notebook it renders as one.

    Attributes:
      rows: one `Row` per adapter, `Trainable` leaf and frozen `QuantizedArray` or `Bf16Bits`, in tree order.
      trainable: the parameters trained (adapter factors and `Trainable` leaves).
      total: all parameters, frozen and trained.
      skipped: ``(path, why)`` of each weight used linearly that ``"all-linear"`` passed over (an
        integer table, an elementwise scale written as an einsum).

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: (x @ p["v"] + x @ p["w"]).sum() + jnp.sum(p["w"] ** 2)  # a penalty on W
    >>> base = {"v": jnp.ones((4, 3)), "w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    >>> report = lorax.explain(fn, lp, jnp.ones((1, 4)))
    >>> [(row.path, row.how) for row in report.rows]
    [('v', 'factored (dot_general)'), ('w', 'materialized: integer_pow')]
    >>> report.materialized, report.trainable, report.total, round(report.share, 3)
    (['w'], 28, 52, 0.538)
    >>> print(report)
    path  shape  kind  rank  scale  params  computed
    ----  -----  ----  ----  -----  ------  -------------------------
    v     4x3    lora  2     1      14      factored (dot_general)
    w     4x3    lora  2     1      14      materialized: integer_pow
    trainable 28 of 52 parameters (53.8462%)
    """

    rows: list[Row]
    trainable: int
    total: int
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why) "all-linear" passed over

    @property
    def share(self) -> float:
        """``trainable / total``: the fraction of parameters trained (0.0 for an empty tree)."""
        return self.trainable / self.total if self.total else 0.0

    @property
    def materialized(self) -> list[str]:
        """The paths of the adapted weights some use of which was materialized (``W + s·a·b``
        built for that use): candidates for a missing rule, or for leaving untargeted."""
        return [r.path for r in self.rows if "materialized" in r.how]

    def __str__(self) -> str:
        head, body, foot = display.explanation_cells(self)
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        return "\n".join([*lines, foot, *(f"skipped {path}: {why}" for path, why in self.skipped)])

    def _repr_markdown_(self) -> str:
        return display.explanation_markdown(self)

    def _repr_html_(self) -> str:
        return display.explanation_html(self)


def explain(fn: Callable, params: Any, *args, **kwargs) -> Explanation:
    """Trace ``lorax.lora(fn)`` abstractly and report each adapted weight.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, {"w": jnp.ones((4, 3))}, jnp.ones((1, 4)))
    >>> print(lorax.explain(fn, lp, jnp.ones((1, 4))).rows[0].how)
    factored (dot_general)

    Weights ``"all-linear"`` passes over are listed with the reason (here an RMSNorm scale
    written as an einsum, as penzai does):

    >>> norm = lambda p, x: jnp.einsum("be,e->be", x, p["scale"]) @ p["w"]
    >>> base = {"scale": jnp.ones(4), "w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), norm, base, jnp.ones((1, 4)))
    >>> lorax.explain(norm, lp, jnp.ones((1, 4))).skipped
    [('scale', 'its use contracts no axis (an elementwise scale)')]
    """
    ctx = transform.Context()
    flat = flatten_call(params, args, kwargs)

    def run(*values):
        p, a, k = flat.rebuild(values)
        return transform.call(fn, p, a, k, rng=None, ctx=ctx)

    jax.eval_shape(run, *[flat.leaves[i] for i in flat.dynamic])
    rows, trainable, total = [], 0, 0
    for name, leaf in named_leaves(params):
        if isinstance(leaf, Adapter):
            total += math.prod(leaf.shape) + leaf.num_adapter_params()
            trainable += leaf.num_adapter_params()
            over = f" over {leaf.w.fmt}" if is_frozen_base(leaf.w) else ""
            rows.append(Row(name, leaf.shape, leaf.rank, leaf.scale, leaf.num_adapter_params(),
                            _how(ctx.uses.get(name, [])) + over, leaf.kind))
        elif is_frozen_base(leaf):  # a frozen quantized (or bf16-bits) weight: how its uses read it
            total += math.prod(leaf.shape)
            per_use = "dequantized per use" if isinstance(leaf, QuantizedArray) else "reinterpreted per use"
            how = _how(ctx.uses.get(name, [])).replace("factored", per_use)
            rows.append(Row(name, leaf.shape, 0, 0.0, 0, how, f"frozen {leaf.fmt}"))
        elif isinstance(leaf, Trainable):
            size = math.prod(leaf.value.shape)
            total, trainable = total + size, trainable + size
            rows.append(Row(name, tuple(leaf.value.shape), 0, 1.0, size, "trained fully", "trainable"))
        elif _is_parameter(leaf):
            total += math.prod(leaf.shape)
    return Explanation(rows, trainable, total, _skipped(fn, params, args, kwargs))


def _is_parameter(leaf: Any) -> bool:
    """A plain floating-point array: integer state and PRNG keys (an NNX state's RNG counters
    and keys) are in the tree but are not parameters."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape") or jnp.issubdtype(dtype, jax.dtypes.extended):
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _skipped(fn: Callable, params: Any, args: tuple, kwargs: dict) -> list[tuple[str, str]]:
    """``(path, reason)`` of each plain leaf used linearly that ``"all-linear"`` passes over."""
    flat, uses = uses_of(fn, params, args, kwargs)
    out = []
    for i, name in enumerate(flat.names[: flat.num_params]):
        leaf_uses = uses.get(i, [])
        if leaf_uses and not is_node(flat.leaves[i]) and not any(u.lookup for u in leaf_uses):
            reason = unfit(flat.leaves[i], first_use(leaf_uses))
            if reason:
                out.append((name, reason))
    return out


def _how(uses: list[transform.How]) -> str:
    if not uses:
        return "unused"
    materialized = sorted({u.reason for u in uses if not u.factored})
    if materialized:
        return "materialized: " + ", ".join(materialized)
    return "factored (" + ", ".join(sorted({u.primitive for u in uses})) + ")"
