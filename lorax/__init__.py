"""lorax: LoRA as a pure, factored transform over JAX parameter pytrees.

>>> import jax, jax.numpy as jnp, lorax
>>> fn = lambda p, x: x @ p["w"]
>>> params = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, {"w": jnp.ones((4, 3))}, jnp.ones((1, 4)))
>>> lorax.lora(fn)(params, jnp.ones((1, 4))).shape
(1, 3)
"""

from lorax import adapters as adapters  # noqa: E402  (after the kinds it builds on)
from lorax._src.bases.bits import Bf16Bits as Bf16Bits
from lorax._src.bases.quantize import gguf_tensor as gguf_tensor
from lorax._src.bases.quantize import merge_quantized as merge_quantized
from lorax._src.bases.quantize import quantize as quantize
from lorax._src.bases.quantized import QuantizedArray as QuantizedArray
from lorax._src.config import ALL_LINEAR as ALL_LINEAR
from lorax._src.config import LoraConfig as LoraConfig
from lorax._src.config import Targets as Targets
from lorax._src.explain import Explanation as Explanation
from lorax._src.explain import Row as Row
from lorax._src.explain import explain as explain
from lorax._src.init import init as init
from lorax._src.io.verbs import load as load
from lorax._src.io.verbs import save as save
from lorax._src.kinds import DoraWeight as DoraWeight
from lorax._src.kinds import Ia3Weight as Ia3Weight
from lorax._src.kinds import LohaWeight as LohaWeight
from lorax._src.kinds import LokrWeight as LokrWeight
from lorax._src.kinds import LoraBank as LoraBank
from lorax._src.kinds import LoraWeight as LoraWeight
from lorax._src.kinds import OftWeight as OftWeight
from lorax._src.kinds import VeraWeight as VeraWeight
from lorax._src.kinds.adapter import Adapter as Adapter
from lorax._src.optim import optimizer as optimizer
from lorax._src.sharding import partition_specs as partition_specs
from lorax._src.tracing.transform import lora as lora
from lorax._src.trainable import Trainable as Trainable
from lorax._src.trees import combine as combine
from lorax._src.trees import merge as merge
from lorax._src.trees import split as split
from lorax._src.trees import unmerge as unmerge
from lorax._src.version import __version__ as __version__

__all__ = [
    "ALL_LINEAR",
    "Adapter",
    "Bf16Bits",
    "DoraWeight",
    "Explanation",
    "Ia3Weight",
    "LohaWeight",
    "LokrWeight",
    "LoraBank",
    "LoraConfig",
    "LoraWeight",
    "OftWeight",
    "QuantizedArray",
    "Row",
    "Targets",
    "Trainable",
    "VeraWeight",
    "adapters",
    "combine",
    "explain",
    "gguf_tensor",
    "init",
    "load",
    "lora",
    "merge",
    "merge_quantized",
    "optimizer",
    "partition_specs",
    "quantize",
    "save",
    "split",
    "unmerge",
]
