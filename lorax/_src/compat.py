"""Everything lorax needs from JAX's jaxpr internals, fenced into one module.

Written against jax 0.10 (``Primitive.get_bind_params`` returns the params alone;
nested jit is the ``jit`` primitive, rematerialisation ``remat2``). Older names are
listed beside the current ones; nothing here imports ``jax._src``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend import source_info_util
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var

JIT = frozenset({"jit", "pjit"})
REMAT = frozenset({"remat2", "checkpoint"})
CUSTOM_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
SCAN, COND, WHILE = "scan", "cond", "while"

__all__ = ["ClosedJaxpr", "Jaxpr", "JaxprEqn", "Literal", "Var", "bind", "make_jaxpr",
           "sub_jaxpr", "read", "is_tracer", "source_of"]


def make_jaxpr(fn, *args) -> tuple[ClosedJaxpr, Any]:
    """Trace ``fn(*args)`` abstractly; returns the closed jaxpr and the output shapes."""
    return jax.make_jaxpr(fn, return_shape=True)(*args)


def bind(eqn: JaxprEqn, invals: list, **overrides) -> list:
    """Evaluate one equation as ``jax.core.eval_jaxpr`` does (params replaced by
    ``overrides``); always returns a list. In a rule, ``bind(eqn, [w])`` applies the equation
    (a transpose, a cast) to the frozen weight itself.

    >>> import jax, jax.numpy as jnp
    >>> from lorax.extend import bind
    >>> (eqn,) = jax.make_jaxpr(jnp.transpose)(jnp.ones((2, 3))).eqns
    >>> bind(eqn, [jnp.ones((2, 3))])[0].shape, bind(eqn, [jnp.ones((5, 4))])[0].shape
    ((3, 2), (4, 5))
    """
    params = eqn.primitive.get_bind_params({**eqn.params, **overrides})
    if isinstance(params, tuple):  # jax < 0.5 returned (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def source_of(eqn: JaxprEqn):
    """A context in which new equations carry ``eqn``'s traceback and name stack (its model
    module's scope, e.g. ``q_proj``), as ``jax.core.eval_jaxpr`` gives them: profiles and HLO
    of a `lora` program then name the model's layers."""
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    return source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)


def sub_jaxpr(eqn: JaxprEqn) -> tuple[Jaxpr, list]:
    """The (jaxpr, consts) called by a jit, remat or custom-derivative equation."""
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if name in eqn.params:
            inner = eqn.params[name]
            if isinstance(inner, ClosedJaxpr):
                return inner.jaxpr, list(inner.consts)
            return inner, []
    raise NotImplementedError(f"lorax: no sub-jaxpr found in {eqn.primitive.name!r}")


def read(env: dict, atom) -> Any:
    return atom.val if isinstance(atom, Literal) else env[atom]


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is an abstract value being traced (not a concrete array)."""
    return isinstance(x, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]
