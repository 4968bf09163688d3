"""Control-flow rules: jit, remat, scan, cond, while and custom derivatives.

``read`` follows the weight into the body. ``apply`` re-expresses the primitive with public
``jax`` / ``jax.lax`` calls whose body the interpreter (``ctx``) evaluates the same way, so
the weight stays factored inside. A custom_jvp/vjp call has no ``apply``: JAX must see its
own function, so the weight is materialized for that call (and `explain` says so).
"""

from __future__ import annotations

import jax
from jax import lax

from lorax._src import compat
from lorax._src.bases.bits import Bf16Bits, Differentiated, carried_as_bits
from lorax._src.kinds.adapter import Adapter
from lorax._src.tracing.table import apply, rule
from lorax._src.tracing.tracked import is_tracked
from lorax._src.tracing.uses import View


@rule(*compat.JIT, *compat.REMAT, *compat.CUSTOM_CALLS, kind="control")
def _read_call(eqn, vs, walk):
    inner, _ = compat.sub_jaxpr(eqn)
    return walk(inner, vs), []


@apply(*compat.JIT, adapter=Adapter)
def _inline(eqn, invals, ctx):
    """Nested jit: inline its body so the weight keeps flowing factored."""
    jaxpr, consts = compat.sub_jaxpr(eqn)
    return ctx.eval(jaxpr, consts, invals)


@apply(*compat.REMAT, adapter=Adapter)
def _remat(eqn, invals, ctx):
    jaxpr, consts = compat.sub_jaxpr(eqn)
    run = jax.checkpoint(ctx.closed_fn(jaxpr, consts), prevent_cse=eqn.params["prevent_cse"],
                         policy=eqn.params["policy"])
    return run(*invals)


@rule(compat.COND, kind="control")
def _read_cond(eqn, vs, walk):
    for branch in eqn.params["branches"]:
        walk(branch.jaxpr, vs[1:])
    return [None] * len(eqn.outvars), []


@apply(compat.COND, adapter=Adapter)
def _cond(eqn, invals, ctx):
    index, *operands = invals
    branches = [ctx.closed_fn(br.jaxpr, br.consts) for br in eqn.params["branches"]]
    return lax.switch(ctx.materialized(index, "cond index"), branches, *operands)


@rule(compat.WHILE, kind="control")
def _read_while(eqn, vs, walk):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = [None] * (len(vs) - nc - nb)
    walk(p["cond_jaxpr"].jaxpr, [*vs[:nc], *carry])
    walk(p["body_jaxpr"].jaxpr, [*vs[nc:nc + nb], *carry])
    return [None] * len(eqn.outvars), []


@apply(compat.WHILE, adapter=Adapter)
def _while(eqn, invals, ctx):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
    init = [ctx.materialized(v, "while_loop carry") for v in invals[nc + nb:]]
    cond = ctx.closed_fn(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts)
    body = ctx.closed_fn(p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts)
    return lax.while_loop(lambda c: cond(*cond_consts, *c)[0], lambda c: body(*body_consts, *c), init)


@rule(compat.SCAN, kind="control")
def _read_scan(eqn, vs, walk):
    """Scanning over a weight's leading axis makes it a stack of layers."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    xs = [None if v is None or not v.axes else View(v.leaf, v.axes[1:], (*v.stacked, v.axes[0]))
          for v in vs[nc + nk:]]
    walk(p["jaxpr"].jaxpr, [*vs[:nc], *[None] * nk, *xs])
    return [None] * len(eqn.outvars), []


@apply(compat.SCAN, adapter=Adapter)
def _scan(eqn, invals, ctx):
    """Weights stacked along the scanned axis are sliced together with their trained arrays;
    a frozen bf16 stack, with the bf16 backward on, as its bits (`lorax._src.bases.bits`)."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    init = [ctx.materialized(v, "scan carry") for v in init]
    xs, rebuilds = zip(*[_scan_slice(v, p["length"], ctx) for v in xs]) if xs else ((), ())
    inner = p["jaxpr"]

    def body(carry, x):
        x = [rebuild(v) for rebuild, v in zip(rebuilds, x)]
        out = ctx.closed_fn(inner.jaxpr, inner.consts)(*consts, *carry, *x)
        return out[:nk], out[nk:]

    carry, ys = lax.scan(body, init, list(xs), length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"], _split_transpose=p.get("_split_transpose", False))
    return [*carry, *ys]


def _scan_slice(value, length: int, ctx):
    """What ``lax.scan`` receives for one ``xs`` input, and how to rebuild each slice."""
    if not is_tracked(value):
        return value, lambda v: v
    lw = value.weight
    if not lw.stack_axes or lw.stack_axes[0] != 0:
        return ctx.materialized(value, "scan over a non-stacked axis"), lambda v: v
    if ctx.narrow is not None and carried_as_bits(lw.w):  # XLA:CPU would slice an fp32 copy of a bf16 stack
        try:
            lw = lw.replace(w=Bf16Bits.of(lw.w))
        except Differentiated:  # being differentiated: it stays bf16
            pass
    keys = None if value.key is None else jax.random.split(value.key, length)
    names = lw.stacked_fields()

    def rebuild(sliced):
        arrays, key = sliced
        return value.replace(weight=lw.unstacked(**dict(zip(names, arrays))), key=key)

    return ([getattr(lw, n) for n in names], keys), rebuild
