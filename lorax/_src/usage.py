"""Which parameters a function uses as matmul, convolution or lookup weights, and how.

`lorax.init` reads this off the jaxpr: a weight's *contracted* axes go to ``a``, its
*output* axes to ``b``, and axes sliced by ``scan`` (or dot batch axes) are stacked
layers. The decision follows how the weight is used, not its shape.
"""

from __future__ import annotations

import dataclasses

from lorax._src import compat


@dataclasses.dataclass(frozen=True)
class View:
    """A variable that is parameter ``leaf`` seen through transposes, casts and scans:
    ``axes[k]`` is the parameter axis behind the variable's axis ``k``."""

    leaf: int
    axes: tuple[int, ...]
    stacked: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Use:
    kind: str  # "dot", "conv" or "lookup"
    a_axes: tuple[int, ...]
    b_axes: tuple[int, ...]
    stack_axes: tuple[int, ...]


_SAME_LAYOUT = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision"}


def find_uses(jaxpr: compat.Jaxpr, views: list[View | None]) -> dict[int, list[Use]]:
    uses: dict[int, list[Use]] = {}
    _walk(jaxpr, views, uses)
    return uses


def _use(view: View, kind: str, contracted, batch) -> tuple[int, Use]:
    contracted, batch = set(contracted), set(batch)
    free = [k for k in range(len(view.axes)) if k not in contracted | batch]
    pick = lambda ks: tuple(sorted(view.axes[k] for k in ks))  # noqa: E731
    return view.leaf, Use(kind, pick(contracted), pick(free), tuple(sorted((*pick(batch), *view.stacked))))


def _walk(jaxpr, views, uses) -> list[View | None]:
    env: dict = {}
    for var, view in zip(jaxpr.invars, views):
        if view is not None:
            env[var] = view
    get = lambda v: env.get(v) if isinstance(v, compat.Var) else None  # noqa: E731
    for eqn in jaxpr.eqns:
        vs = [get(v) for v in eqn.invars]
        if not any(vs):
            continue
        name, p = eqn.primitive.name, eqn.params
        outs: list = [None] * len(eqn.outvars)
        found: list[tuple[int, Use]] = []
        if name == "transpose":
            v = vs[0]
            outs = [View(v.leaf, tuple(v.axes[k] for k in p["permutation"]), v.stacked)]
        elif name in _SAME_LAYOUT or (name in ("slice", "dynamic_slice") and vs[0] is not None):
            outs = [vs[0]]  # a slice keeps every axis; slicing one layer out of a stack ...
        elif name == "squeeze":  # ... then squeezing it makes that axis a stack axis
            v, dims = vs[0], p["dimensions"]
            outs = [View(v.leaf, tuple(a for k, a in enumerate(v.axes) if k not in dims),
                         (*v.stacked, *(v.axes[k] for k in dims)))]
        elif name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for v, c, b in ((vs[0], lc, lb), (vs[1], rc, rb)):
                if v is not None:
                    found.append(_use(v, "dot", c, b))
        elif name == "conv_general_dilated" and vs[1] is not None:
            rhs_spec = p["dimension_numbers"].rhs_spec
            if (p["feature_group_count"], p["batch_group_count"]) == (1, 1):
                found.append(_use(vs[1], "conv", rhs_spec[1:], ()))
        elif name == "gather" and vs[0] is not None:
            dn, v = p["dimension_numbers"], vs[0]
            full = [k for k in range(len(v.axes)) if k not in (*dn.collapsed_slice_dims,
                    *dn.start_index_map, *dn.operand_batching_dims)
                    and p["slice_sizes"][k] == eqn.invars[0].aval.shape[k]]
            if len(full) == 1:
                found.append(_use(v, "lookup", [k for k in range(len(v.axes)) if k != full[0]], ()))
        elif name in compat.JIT or name in compat.REMAT or name in compat.CUSTOM_CALLS:
            inner, _ = compat.sub_jaxpr(eqn)
            outs = _walk(inner, vs, uses)
        elif name == compat.SCAN:
            nc, nk = p["num_consts"], p["num_carry"]
            xs = [None if v is None or not v.axes else
                  View(v.leaf, v.axes[1:], (*v.stacked, v.axes[0])) for v in vs[nc + nk:]]
            _walk(p["jaxpr"].jaxpr, [*vs[:nc], *[None] * nk, *xs], uses)
        elif name == compat.COND:
            for branch in p["branches"]:
                _walk(branch.jaxpr, vs[1:], uses)
        elif name == compat.WHILE:
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            carry = [None] * (len(vs) - nc - nb)
            _walk(p["cond_jaxpr"].jaxpr, [*vs[:nc], *carry], uses)
            _walk(p["body_jaxpr"].jaxpr, [*vs[nc:nc + nb], *carry], uses)
        for leaf, use in found:
            uses.setdefault(leaf, []).append(use)
        for var, view in zip(eqn.outvars, outs):
            if view is not None:
                env[var] = view
    return [get(v) for v in jaxpr.outvars]
