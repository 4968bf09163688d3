"""Which parameters a function uses as matmul, convolution or lookup weights, and how.

`lorax.init` reads this off the jaxpr with the ``read`` side of the rule table: a weight's
*contracted* axes go to ``a``, its *output* axes to ``b``, and axes sliced by ``scan`` (or
dot batch axes) are stacked layers. The decision follows how the weight is used, not its shape.
"""

from __future__ import annotations

import dataclasses

from lorax._src import compat
from lorax._src.tracing.table import RULES


@dataclasses.dataclass(frozen=True)
class View:
    """A variable that is parameter ``leaf`` seen through transposes, casts and scans:
    ``axes[k]`` is the parameter axis behind the variable's axis ``k``."""

    leaf: int
    axes: tuple[int, ...]
    stacked: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Use:
    """One product that consumes a parameter: through ``primitive``, contracting ``a_axes``,
    producing ``b_axes``, batched over ``stack_axes``; ``lookup`` for a table read by index."""

    primitive: str
    a_axes: tuple[int, ...]
    b_axes: tuple[int, ...]
    stack_axes: tuple[int, ...]
    lookup: bool = False


def use_of(view: View, primitive: str, contracted, batch, lookup: bool = False) -> tuple[int, Use]:
    """The `Use` of ``view``'s parameter when its axes ``contracted`` are summed over and
    ``batch`` are batch axes; the other axes are outputs."""
    contracted, batch = set(contracted), set(batch)
    free = [k for k in range(len(view.axes)) if k not in contracted | batch]
    pick = lambda ks: tuple(sorted(view.axes[k] for k in ks))  # noqa: E731
    return view.leaf, Use(primitive, pick(contracted), pick(free),
                          tuple(sorted((*pick(batch), *view.stacked))), lookup)


def find_uses(jaxpr: compat.Jaxpr, views: list[View | None]) -> dict[int, list[Use]]:
    uses: dict[int, list[Use]] = {}
    walk(jaxpr, views, uses)
    return uses


def walk(jaxpr, views: list[View | None], uses: dict[int, list[Use]]) -> list[View | None]:
    """Follow parameter views through ``jaxpr``, recording uses; returns the outputs' views."""
    env: dict = {}
    for var, view in zip(jaxpr.invars, views):
        if view is not None:
            env[var] = view
    get = lambda v: env.get(v) if isinstance(v, compat.Var) else None  # noqa: E731
    inner = lambda body, body_views: walk(body, body_views, uses)  # noqa: E731
    for eqn in jaxpr.eqns:
        vs = [get(v) for v in eqn.invars]
        entry = RULES.get(eqn.primitive.name)
        if not any(vs) or entry is None:
            continue
        outs, found = entry.read(eqn, vs, inner)
        for leaf, use in found:
            uses.setdefault(leaf, []).append(use)
        for var, view in zip(eqn.outvars, outs):
            if view is not None:
                env[var] = view
    return [get(v) for v in jaxpr.outvars]
