"""A frozen weight that takes no adapter, as `lorax.lora` sees it: a frozen base alone.

`lorax.lora` binds each quantized weight and each plain bf16/fp16 matrix of ``params`` to a
`FrozenBase`, so that views of it (a layer sliced off a stack inside ``scan``, a transpose, a
cast) stay what they are, like an adapter's base, and each product is computed as the base's
(`products.base_product`): a quantized weight dequantized at the use
(`QuantizedArray.lorax_product`), a low-precision one (bf16 bits and a quantized weight cast to
bf16 included) with its backward in its own precision
(`lorax._src.bases.precision`). It is never in a tree.
"""

from __future__ import annotations

import dataclasses

import jax

from lorax._src.bases.bits import Bf16Bits
from lorax._src.bases.quantized import QuantizedArray, dense
from lorax._src.kinds.adapter import Adapter
from lorax._src.tracing.rules import products
from lorax._src.tracing.table import apply
from lorax._src.tracing.tracked import is_tracked


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class FrozenBase(Adapter):
    """A base weight with no trained arrays; every axis counts as stacked, so slicing any of
    them is a view."""

    kind = "frozen"

    @classmethod
    def of(cls, w: QuantizedArray | Bf16Bits | jax.Array) -> FrozenBase:
        return cls(w, a_axes=(), b_axes=(), stack_axes=tuple(range(len(w.shape))))

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        return {}

    def merged(self) -> jax.Array:
        return dense(self.w)


@apply("dot_general", "conv_general_dilated", "gather", adapter=FrozenBase)
def _product(eqn, invals, ctx):
    """The product with the base dequantized at this use."""
    positions = [i for i, v in enumerate(invals) if is_tracked(v)]
    if len(positions) != 1:
        return None
    (position,) = positions
    operands = [v.weight.w if i == position else v for i, v in enumerate(invals)]
    return [products.base_product(eqn, operands, position, ctx.narrow)]
