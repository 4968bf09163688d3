"""`lorax.lora`: run any JAX function on a tree holding adapter nodes, factored.

The function is traced to a jaxpr over the plain weights, then evaluated again with each
adapted weight bound to a `Tracked` value. An equation that consumes one is computed by its
rule in the table (`lorax._src.tracing.table`): views stay lazy, products run factored, control flow
is re-expressed with the body interpreted the same way. A use with no rule materializes the
adapted weight for that use alone, and the reason is recorded for `explain`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lorax._src.kinds  # noqa: F401  (registers the adapter kinds and their rules)
import lorax._src.tracing.rules  # noqa: F401  (registers the view, product and control rules)
from lorax._src import compat
from lorax._src.bases import precision
from lorax._src.bases.quantized import is_frozen_base
from lorax._src.kinds.adapter import Adapter
from lorax._src.kinds.frozen import FrozenBase
from lorax._src.kinds.lowrank import Views
from lorax._src.tracing.table import RULES
from lorax._src.tracing.trace import flatten_call, trace
from lorax._src.tracing.tracked import Tracked, unwrap
from lorax._src.trainable import Trainable


@dataclasses.dataclass(frozen=True)
class How:
    """How one use of an adapted weight was computed: through ``primitive``, factored or
    materialized (then ``reason`` says why)."""

    primitive: str
    factored: bool
    reason: str = ""


@dataclasses.dataclass
class Context:
    """What rules see of the interpreter during one `lorax.lora` call: it evaluates bodies,
    counts adapter uses (for distinct dropout masks), notes how each use was computed and
    keeps the activation views adapters share. ``narrow`` (None: JAX's own rules): frozen
    low-precision products take their backward in their own precision, and it notes the bf16
    casts of wider arrays they may take instead (`lorax._src.bases.precision`)."""

    uses: dict[str, list[How]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    count: int = 0
    views: Views = dataclasses.field(default_factory=Views)
    narrow: precision.Narrowing | None = dataclasses.field(default_factory=precision.Narrowing)

    def next_use(self) -> int:
        self.count += 1
        return self.count

    def note(self, label: str, how: How) -> None:
        self.uses[label].append(how)

    def eval(self, jaxpr: compat.Jaxpr, consts: list, args: list) -> list:
        """Evaluate ``jaxpr``; outputs may still be `Tracked` (a weight passed through)."""
        env: dict = {}
        for var, val in zip(jaxpr.constvars, consts):
            env[var] = val
        for var, val in zip(jaxpr.invars, args):
            env[var] = val
        for eqn in jaxpr.eqns:
            invals = [compat.read(env, v) for v in eqn.invars]
            with compat.source_of(eqn):
                if any(isinstance(v, Tracked) for v in invals):
                    outvals = self._apply(eqn, invals)
                else:
                    outvals = compat.bind(eqn, invals)
                    if self.narrow is not None:
                        self.narrow.note(eqn, invals, outvals)
            for var, val in zip(eqn.outvars, outvals):
                env[var] = val
        return [compat.read(env, v) for v in jaxpr.outvars]

    def closed_fn(self, jaxpr: compat.Jaxpr, consts: list) -> Callable[..., list]:
        """A function evaluating ``jaxpr`` whose outputs are plain arrays."""

        def run(*args):
            return [unwrap(v) for v in self.eval(jaxpr, consts, list(args))]

        return run

    def materialized(self, value: Any, why: str) -> Any:
        """``value`` as a plain array, noting why when it was an adapted weight."""
        if isinstance(value, Tracked):
            self.note(value.label, How(why, factored=False, reason=why))
        return unwrap(value)

    def _apply(self, eqn, invals: list) -> list:
        name = eqn.primitive.name
        tracked = [v for v in invals if isinstance(v, Tracked)]
        entry = RULES.get(name)
        handler = entry.handler(type(tracked[0].weight)) if entry else None
        out = handler(eqn, invals, self) if handler else None
        if entry is None or out is None:
            for label in sorted({v.label for v in tracked}):
                self.note(label, How(name, factored=False, reason=name))
            return compat.bind(eqn, [unwrap(v) for v in invals])
        if entry.kind == "product":
            for label in {v.label for v in tracked}:
                self.note(label, How(name, factored=True))
        return out


def call(fn: Callable, params: Any, args: tuple, kwargs: dict, *, rng: jax.Array | None,
         ctx: Context) -> Any:
    """``fn(params, *args, **kwargs)`` with adapted weights factored; see `lora`."""
    flat = flatten_call(params, args, kwargs)
    closed, out_tree = trace(fn, flat)
    invals = []
    for n, i in enumerate(flat.dynamic):
        leaf, name = flat.leaves[i], flat.names[i]
        if isinstance(leaf, Adapter):
            leaf.check(name)
            key = None if rng is None or leaf.dropout == 0.0 else jax.random.fold_in(rng, n)
            invals.append(Tracked(leaf.replace(w=lax.stop_gradient(leaf.w)), key, name))
        elif is_frozen_base(leaf) or (ctx.narrow is not None and i < flat.num_params
                                      and precision.frozen_low_precision(leaf)):
            invals.append(Tracked(FrozenBase.of(leaf), None, name))
        elif isinstance(leaf, Trainable) and is_frozen_base(leaf.value):
            raise ValueError(f"lorax.lora: {name!r} (shape {leaf.value.shape}) is a quantized weight marked "
                             f"Trainable ({leaf.value.fmt}); quantized weights are frozen. Train a LoRA adapter "
                             "over it instead.")
        else:
            invals.append(leaf.value if isinstance(leaf, Trainable) else leaf)
    outs = ctx.eval(closed.jaxpr, closed.consts, invals)
    return jax.tree_util.tree_unflatten(out_tree, [ctx.materialized(v, "returned") for v in outs])


def _is_key(x: Any) -> bool:
    """A typed key, or a legacy ``uint32[2]`` one."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return np.dtype(dtype) == np.uint32 and tuple(getattr(x, "shape", ())) == (2,)


def lora(fn: Callable, *, rng: jax.Array | None = None, low_precision_backward: bool = True) -> Callable:
    """Make ``fn(params, *args, **kwargs)`` accept a tree holding adapter nodes.

    Each dense, einsum, convolution and embedding use of a LoRA weight computes
    ``x·W + s·(x·A)·B`` (and its convolution / lookup / transposed forms) without ever
    building ``W + s·A·B``; ``W`` gets no gradient. ``rng`` turns on adapter dropout
    (each weight's ``dropout`` rate); without it dropout is off.

    Frozen bf16 weights (adapters' bases and the plain bf16 matrices of ``params``)
    multiplied as bf16 operands accumulated in fp32 take their backward in bf16 too, as
    torch's autocast does: the cotangent is rounded to bf16 before it meets the weight, which
    spares XLA:CPU an fp32 copy of every such weight per step and runs the backward on the
    bf16 engine; where ``fn`` casts an fp32 activation to bf16 for such a product, the gradient
    reaching the fp32 activation comes back in fp32, not rounded to bf16 on its way.
    ``low_precision_backward=False`` keeps JAX's own fp32 backward, and with it
    forward-mode AD (``jax.jvp``), which that custom backward does not support. fp16 weights
    always keep JAX's backward: fp16 cotangents underflow. A frozen bf16 stack that ``fn``
    scans over goes through the loop as its bits (XLA:CPU would slice an fp32 copy of it); a
    plain one differentiated only after tracing (``jax.grad`` of a jitted ``lora`` function
    with respect to it) is refused, and this flag is the fix.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, params, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(lorax.lora(fn)(lp, jnp.ones((1, 4))), fn(params, jnp.ones((1, 4)))))
    True
    """

    if not callable(fn):
        raise TypeError(f"lorax.lora: fn must be callable, got {type(fn).__name__}.")
    if not isinstance(low_precision_backward, (bool, np.bool_)):
        raise TypeError("lorax.lora: low_precision_backward must be True or False, got "
                        f"{low_precision_backward!r} ({type(low_precision_backward).__name__}).")
    if rng is not None and not _is_key(rng):
        raise TypeError("lorax.lora: rng must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)) "
                        f"or None, got {type(rng).__name__} {getattr(rng, 'shape', '')}.")
    low_precision_backward = bool(low_precision_backward)

    @functools.wraps(fn)
    def wrapped(params, *args, **kwargs):
        narrow = precision.Narrowing() if low_precision_backward else None
        return call(fn, params, args, kwargs, rng=rng, ctx=Context(narrow=narrow))

    return wrapped
