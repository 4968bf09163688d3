"""The one rule table: per primitive, how `init` reads a weight's use and how `lora` computes it.

Each primitive that can touch an adapted weight has one `Rule`:

- ``kind``: ``"view"`` (transpose, cast, slice of a stack: the weight stays lazy),
  ``"product"`` (dot, convolution, lookup: computed factored) or ``"control"`` (jit,
  remat, scan, cond, while: the body is interpreted the same way);
- ``read(eqn, views, walk)``: for `lorax.init`, which parameter axes each output variable
  stands for and which uses were found (see `lorax._src.tracing.uses`);
- ``apply``: for `lorax.lora`, ``{adapter kind: fn(eqn, invals, ctx)}`` returning the outputs,
  or ``None`` when this use cannot be factored (the weight is then materialized for this
  use alone, with the reason recorded). A view or control rule registers one function for
  every kind (`Adapter`); a product rule registers one per kind, found along the kind's MRO;
- ``base``: for a view, ``{frozen base type: fn(eqn, w, rest)}``, the view of a base that is
  not a plain array (a `QuantizedArray` transposes or slices its codes), or ``None`` to have
  it applied to the dense weight.

Nothing outside this table lists primitives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

Kind = Literal["view", "product", "control"]


@dataclasses.dataclass
class Rule:
    """Everything lorax knows of one primitive, for `lorax.init` and `lorax.lora` alike.

    Attributes:
      kind: ``"view"`` (transpose, cast, slice of a stack: the weight stays lazy),
        ``"product"`` (dot, convolution, lookup: computed factored) or ``"control"`` (jit,
        remat, scan, cond, while: the body is interpreted the same way).
      read: ``read(eqn, views, walk)``, for `lorax.init`: which parameter axes each output
        stands for and which uses of a weight the equation makes; ``walk(jaxpr, views)``
        follows a weight into a body.
      apply: ``{adapter type: fn(eqn, invals, ctx)}``, for `lorax.lora`: the equation's outputs,
        or None when this use cannot be factored (the weight is then materialized for this use
        alone and `lorax.explain` says why). Found along the adapter type's MRO.
      base: ``{frozen base type: fn(eqn, w, rest)}``, for a view: the viewed base, or None to
        apply the view to the dense weight (`view_base`). Plain arrays need none.

    >>> import lorax
    >>> from lorax.extend import RULES
    >>> RULES["dot_general"].kind, RULES["transpose"].kind, RULES["scan"].kind
    ('product', 'view', 'control')
    >>> RULES["dot_general"].handler(lorax.DoraWeight) is not None
    True
    """

    kind: Kind
    read: Callable[..., Any]
    apply: dict[type, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    base: dict[type, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    def handler(self, adapter_type: type) -> Callable[..., Any] | None:
        """The ``apply`` function for ``adapter_type`` or its nearest base class, or None."""
        return _nearest(self.apply, adapter_type)

    def base_handler(self, base_type: type) -> Callable[..., Any] | None:
        """The ``base`` function for a frozen base of ``base_type``, or None."""
        return _nearest(self.base, base_type)


def _nearest(table: dict[type, Callable[..., Any]], cls: type) -> Callable[..., Any] | None:
    return next((table[c] for c in cls.__mro__ if c in table), None)


RULES: dict[str, Rule] = {}
"""The rule table: one `Rule` per primitive name lorax reads and computes.

>>> from lorax.extend import RULES
>>> "dot_general" in RULES, "neg" in RULES
(True, False)
"""


def rule(*names: str, kind: Kind) -> Callable:
    """Register ``read`` for the primitives ``names``, as a decorator:
    ``@rule("neg", kind="view")`` over ``def read(eqn, views, walk) -> (out_views, uses)``.

    A view's ``read`` usually returns ``[views[0]], []``: the output stands for the same
    parameter axes as the input, and the equation makes no use of its own.

    >>> import jax, jax.numpy as jnp, lorax
    >>> from lorax import extend
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"]) - jnp.tanh(x @ -p["w"])
    >>> x = jnp.ones((2, 4))
    >>> params = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, {"w": jnp.ones((4, 3))}, x)
    >>> lorax.explain(fn, params, x).rows[0].how
    'materialized: neg'
    >>> @extend.rule("neg", kind="view")
    ... def read_neg(eqn, views, walk):
    ...     return [views[0]], []
    >>> @extend.apply("neg", adapter=lorax.LoraWeight)        # -(W + s·A·B) = (-W) + s·(-A)·B
    ... def negate(eqn, invals, ctx):
    ...     (t,) = invals
    ...     return [t.with_weight(t.weight.replace(w=-t.weight.w, a=-t.weight.a))]
    >>> lorax.explain(fn, params, x).rows[0].how
    'factored (dot_general)'
    >>> del extend.RULES["neg"]
    """

    def add(read):
        for name in names:
            RULES[name] = Rule(kind, read)
        return read

    return add


def apply(*names: str, adapter: type) -> Callable:
    """Register how adapters of type ``adapter`` are computed through the primitives ``names``
    (each must already have a `rule`), as a decorator over ``fn(eqn, invals, ctx)``.

    ``invals`` are the equation's inputs, an adapted weight among them as a tracked value (its
    adapter in ``.weight``, with ``w`` already gradient-stopped); ``fn`` returns the list of
    outputs, or None to have this use materialized. Register view and control rules for
    ``lorax.Adapter`` (every kind), product rules for each kind. The example of `rule`
    registers both sides of a view; `lorax.extend`'s, a product for a new kind.

    >>> import lorax
    >>> from lorax.extend import RULES
    >>> sorted(cls.__name__ for cls in RULES["dot_general"].apply)  # doctest: +NORMALIZE_WHITESPACE
    ['DoraWeight', 'FrozenBase', 'Ia3Weight', 'LohaWeight', 'LokrWeight', 'LoraBank', 'LoraWeight', 'OftWeight',
     'VeraWeight']
    """

    def add(fn):
        for name in names:
            RULES[name].apply[adapter] = fn
        return fn

    return add


def view_base(*names: str, base: type) -> Callable:
    """Register how the view primitives ``names`` (each must already have a `rule`) apply to a
    frozen base of type ``base``, as a decorator over ``fn(eqn, w, rest)`` returning the viewed
    base, or None to have the view applied to the dense weight. ``rest`` are the equation's
    other inputs (a dynamic slice's starts).

    >>> import lorax
    >>> from lorax.extend import RULES
    >>> RULES["transpose"].base_handler(lorax.QuantizedArray) is not None   # the codes are transposed
    True
    >>> RULES["reduce_precision"].base_handler(lorax.QuantizedArray) is None  # rounds the dense values
    True
    """

    def add(fn):
        for name in names:
            RULES[name].base[base] = fn
        return fn

    return add


def supports(name: str, adapter_type: type) -> bool:
    """Whether a use through primitive ``name`` is computed factored for this kind."""
    entry = RULES.get(name)
    return entry is not None and entry.handler(adapter_type) is not None
