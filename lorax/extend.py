"""The public surface for writing adapter kinds and primitive rules.

An adapter kind is a frozen dataclass subclassing `Adapter` (or `LowRank`, the base of the LoRA
family, which brings the factors ``a`` and ``b``), registered with `register_kind`, whose
trained arrays are `trained_field`s laid out in terms of W's axes (`RANK` for the rank);
`lorax.init`, `lorax.split`, the optimizer, sharding and checkpoints read only these
declarations. A primitive is one `Rule` in `RULES`: `rule` registers how `lorax.init` reads
it, `apply` how `lorax.lora` computes it for a kind. `dot_parts` takes a matmul with an
adapted weight apart into the frozen product and the low-rank term, the pieces of most
product rules; `bind` evaluates an equation on other inputs.

A kind in a dozen lines, LoRA with a trained gate ``g`` on its update:

>>> import dataclasses, jax, jax.numpy as jnp, lorax
>>> from lorax import extend
>>> @extend.register_kind
... @dataclasses.dataclass(frozen=True, repr=False)
... class GatedLora(extend.LowRank):               # the factors a and b come with LowRank
...     kind = "gated-example"
...     g: jax.Array = extend.trained_field(group="b")
...     def layout(self):
...         return {**super().layout(), "g": ()}
...     def merged(self):
...         return self.w + self.g * self.low_rank()
>>> @extend.apply("dot_general", adapter=GatedLora)
... def gated_dot(eqn, invals, ctx):
...     parts = extend.dot_parts(eqn, invals, ctx)
...     gate = next(v for v in invals if extend.is_tracked(v)).weight.g
...     return None if parts is None else [parts.base + gate * parts.update]
>>> fn = lambda p, x: x @ p["w"]
>>> w, a, b = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.full((2, 3), 0.1)
>>> params = {"w": GatedLora(w, a, b, jnp.array(0.5))}
>>> bool(jnp.allclose(lorax.lora(fn)(params, jnp.ones((1, 4))), fn(lorax.merge(params), jnp.ones((1, 4)))))
True
>>> lorax.split(params)[0]["w"].g is not None       # g is trained, w frozen
True
>>> del extend.KINDS["gated-example"], extend.RULES["dot_general"].apply[GatedLora]
"""

from lorax._src.bases.quantized import dense as dense
from lorax._src.compat import bind as bind
from lorax._src.io.peft_format import PeftFormat as PeftFormat
from lorax._src.kinds.adapter import ADAPTERS as ADAPTERS
from lorax._src.kinds.adapter import KINDS as KINDS
from lorax._src.kinds.adapter import RANK as RANK
from lorax._src.kinds.adapter import Adapter as Adapter
from lorax._src.kinds.adapter import Additive as Additive
from lorax._src.kinds.adapter import frozen_field as frozen_field
from lorax._src.kinds.adapter import register_kind as register_kind
from lorax._src.kinds.adapter import shared_field as shared_field
from lorax._src.kinds.adapter import static_field as static_field
from lorax._src.kinds.adapter import trained_field as trained_field
from lorax._src.kinds.lora import LowRank as LowRank
from lorax._src.tracing.rules.products import DotMatrices as DotMatrices
from lorax._src.tracing.rules.products import DotParts as DotParts
from lorax._src.tracing.rules.products import dot_matrices as dot_matrices
from lorax._src.tracing.rules.products import dot_parts as dot_parts
from lorax._src.tracing.rules.products import factors_dot as factors_dot
from lorax._src.tracing.table import RULES as RULES
from lorax._src.tracing.table import Rule as Rule
from lorax._src.tracing.table import apply as apply
from lorax._src.tracing.table import rule as rule
from lorax._src.tracing.table import view_base as view_base
from lorax._src.tracing.tracked import Tracked as Tracked
from lorax._src.tracing.tracked import is_tracked as is_tracked

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Additive",
    "DotMatrices",
    "DotParts",
    "KINDS",
    "LowRank",
    "PeftFormat",
    "RANK",
    "RULES",
    "Rule",
    "Tracked",
    "apply",
    "bind",
    "dense",
    "dot_matrices",
    "dot_parts",
    "factors_dot",
    "frozen_field",
    "is_tracked",
    "register_kind",
    "rule",
    "shared_field",
    "static_field",
    "trained_field",
    "view_base",
]
