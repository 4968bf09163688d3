"""`lorax.lora`: run any JAX function on a tree holding LoraWeight nodes, factored.

The function is traced to a jaxpr over the plain weights, then evaluated again with
each LoRA weight bound to a `Tracked` value. Equations that consume one use a factored
rule (`lorax._src.rules`); control flow (jit, remat, scan, cond, while) is re-expressed
through public ``jax`` / ``jax.lax`` calls with the body interpreted the same way; any
other use materializes ``w + s·a·b`` for that use alone and is recorded for `explain`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable

import jax
from jax import lax

from lorax._src import compat
from lorax._src.lowrank import Views
from lorax._src.rules import RULES, register_rule
from lorax._src.tracing import flatten_call, trace
from lorax._src.tracked import Tracked, unwrap
from lorax._src.weight import LoraWeight, Trainable


@dataclasses.dataclass
class Recorder:
    """Counts adapter uses (for distinct dropout masks), notes how each was computed and
    keeps the activation views adapters share."""

    uses: dict[str, list[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    count: int = 0
    views: Views = dataclasses.field(default_factory=Views)

    def next_use(self) -> int:
        self.count += 1
        return self.count

    def note(self, label: str, how: str) -> None:
        self.uses[label].append(how)


def eval_jaxpr(jaxpr: compat.Jaxpr, consts: list, args: list, rec: Recorder) -> list:
    """Evaluate ``jaxpr``; outputs may still be `Tracked` (a weight passed through)."""
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [compat.read(env, v) for v in eqn.invars]
        if any(isinstance(v, Tracked) for v in invals):
            outvals = _apply(eqn, invals, rec)
        else:
            outvals = compat.bind(eqn, invals)
        for var, val in zip(eqn.outvars, outvals):
            env[var] = val
    return [compat.read(env, v) for v in jaxpr.outvars]


def _apply(eqn, invals: list, rec: Recorder) -> list:
    name = eqn.primitive.name
    rule = RULES.get(name)
    out = rule(eqn, invals, rec) if rule else None
    labels = {v.label for v in invals if isinstance(v, Tracked)}
    if out is None:
        for label in sorted(labels):
            rec.note(label, f"materialized: {name}")
        return compat.bind(eqn, [unwrap(v) for v in invals])
    if name in _FACTORED:
        for label in labels:
            rec.note(label, f"factored: {name}")
    return out


_FACTORED = {"dot_general", "conv_general_dilated", "gather"}


def _closed_fn(jaxpr, consts, rec: Recorder) -> Callable[..., list]:
    """A function evaluating ``jaxpr`` whose outputs are plain arrays."""

    def run(*args):
        return [unwrap(v) for v in eval_jaxpr(jaxpr, consts, list(args), rec)]

    return run


@register_rule(*compat.JIT)
def _inline(eqn, invals, rec):
    """Nested jit: inline its body so the weight keeps flowing factored."""
    jaxpr, consts = compat.sub_jaxpr(eqn)
    return eval_jaxpr(jaxpr, consts, invals, rec)


@register_rule(*compat.REMAT)
def _remat(eqn, invals, rec):
    jaxpr, consts = compat.sub_jaxpr(eqn)
    run = jax.checkpoint(_closed_fn(jaxpr, consts, rec), prevent_cse=eqn.params["prevent_cse"],
                         policy=eqn.params["policy"])
    return run(*invals)


@register_rule(compat.COND)
def _cond(eqn, invals, rec):
    index, *operands = invals
    branches = [_closed_fn(br.jaxpr, br.consts, rec) for br in eqn.params["branches"]]
    return lax.switch(unwrap(index), branches, *operands)


@register_rule(compat.WHILE)
def _while(eqn, invals, rec):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
    init = [_materialized(v, "while_loop carry", rec) for v in invals[nc + nb:]]
    cond = _closed_fn(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts, rec)
    body = _closed_fn(p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts, rec)
    return lax.while_loop(lambda c: cond(*cond_consts, *c)[0], lambda c: body(*body_consts, *c), init)


@register_rule(compat.SCAN)
def _scan(eqn, invals, rec):
    """Weights stacked along the scanned axis are sliced together with their factors."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    init = [_materialized(v, "scan carry", rec) for v in init]
    xs, rebuilds = zip(*[_scan_slice(v, p["length"], rec) for v in xs]) if xs else ((), ())
    inner = p["jaxpr"]

    def body(carry, x):
        x = [rebuild(v) for rebuild, v in zip(rebuilds, x)]
        out = [unwrap(v) for v in eval_jaxpr(inner.jaxpr, inner.consts, [*consts, *carry, *x], rec)]
        return out[:nk], out[nk:]

    carry, ys = lax.scan(body, init, list(xs), length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"], _split_transpose=p.get("_split_transpose", False))
    return [*carry, *ys]


def _scan_slice(value, length: int, rec: Recorder):
    """What ``lax.scan`` receives for one ``xs`` input, and how to rebuild each slice."""
    if not isinstance(value, Tracked):
        return value, lambda v: v
    lw = value.weight
    if not lw.stack_axes or lw.stack_axes[0] != 0:
        return _materialized(value, "scan over a non-stacked axis", rec), lambda v: v
    keys = None if value.key is None else jax.random.split(value.key, length)
    down = lambda axes: tuple(i - 1 for i in axes)  # noqa: E731
    meta = dict(scale=lw.scale, a_axes=down(lw.a_axes), b_axes=down(lw.b_axes),
                stack_axes=down(lw.stack_axes[1:]), dropout=lw.dropout)

    def rebuild(sliced):
        w, a, b, key = sliced
        return Tracked(LoraWeight(w, a, b, **meta), key, value.label)

    return (lw.w, lw.a, lw.b, keys), rebuild


def _materialized(value, why: str, rec: Recorder):
    if isinstance(value, Tracked):
        rec.note(value.label, f"materialized: {why}")
    return unwrap(value)


def call(fn: Callable, params: Any, args: tuple, kwargs: dict, *, rng: jax.Array | None,
         rec: Recorder) -> Any:
    """``fn(params, *args, **kwargs)`` with LoRA weights factored; see `lora`."""
    flat = flatten_call(params, args, kwargs)
    closed, out_tree = trace(fn, flat)
    invals = []
    for n, i in enumerate(flat.dynamic):
        leaf, name = flat.leaves[i], flat.names[i]
        if isinstance(leaf, LoraWeight):
            leaf.check(name)
            key = None if rng is None or leaf.dropout == 0.0 else jax.random.fold_in(rng, n)
            invals.append(Tracked(dataclasses.replace(leaf, w=lax.stop_gradient(leaf.w)), key, name))
        else:
            invals.append(leaf.value if isinstance(leaf, Trainable) else leaf)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, invals, rec)
    return jax.tree_util.tree_unflatten(out_tree, [_materialized(v, "returned", rec) for v in outs])


def lora(fn: Callable, *, rng: jax.Array | None = None) -> Callable:
    """Make ``fn(params, *args, **kwargs)`` accept a tree holding `LoraWeight` nodes.

    Each dense, einsum, convolution and embedding use of a LoRA weight computes
    ``x·W + s·(x·A)·B`` (and its convolution / lookup / transposed forms) without ever
    building ``W + s·A·B``; ``W`` gets no gradient. ``rng`` turns on adapter dropout
    (each weight's ``dropout`` rate); without it dropout is off.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, params, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(lorax.lora(fn)(lp, jnp.ones((1, 4))), fn(params, jnp.ones((1, 4)))))
    True
    """

    @functools.wraps(fn)
    def wrapped(params, *args, **kwargs):
        return call(fn, params, args, kwargs, rng=rng, rec=Recorder())

    return wrapped
