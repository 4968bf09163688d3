"""The one rule table: per primitive, how `init` reads a weight's use and how `lora` computes it.

Each primitive that can touch an adapted weight has one `Rule`:

- ``kind``: ``"view"`` (transpose, cast, slice of a stack: the weight stays lazy),
  ``"product"`` (dot, convolution, lookup: computed factored) or ``"control"`` (jit,
  remat, scan, cond, while: the body is interpreted the same way);
- ``read(eqn, views, walk)``: for `lorax.init`, which parameter axes each output variable
  stands for and which uses were found (see `lorax._src.usage`);
- ``apply``: for `lorax.lora`, ``{adapter kind: fn(eqn, invals, ctx)}`` returning the outputs,
  or ``None`` when this use cannot be factored (the weight is then materialized for this
  use alone, with the reason recorded). A view or control rule registers one function for
  every kind (`Adapter`); a product rule registers one per kind, found along the kind's MRO.

Nothing outside this table lists primitives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

Kind = Literal["view", "product", "control"]


@dataclasses.dataclass
class Rule:
    kind: Kind
    read: Callable[..., Any]
    apply: dict[type, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    def handler(self, adapter_type: type) -> Callable[..., Any] | None:
        for cls in adapter_type.__mro__:
            if cls in self.apply:
                return self.apply[cls]
        return None


RULES: dict[str, Rule] = {}


def rule(*names: str, kind: Kind) -> Callable:
    """Register ``read`` for ``names``: ``@rule("dot_general", kind="product")``."""

    def add(read):
        for name in names:
            RULES[name] = Rule(kind, read)
        return read

    return add


def apply(*names: str, adapter: type) -> Callable:
    """Register how adapters of type ``adapter`` are computed through ``names``."""

    def add(fn):
        for name in names:
            RULES[name].apply[adapter] = fn
        return fn

    return add


def supports(name: str, adapter_type: type) -> bool:
    """Whether a use through primitive ``name`` is computed factored for this kind."""
    entry = RULES.get(name)
    return entry is not None and entry.handler(adapter_type) is not None
