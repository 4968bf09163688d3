"""llama.cpp interop: `save_adapter` writes a LoRA adapter GGUF that llama.cpp loads (``--lora``).

The file applies on top of the base model's own GGUF, quantized or not; `Names` gives each
adapted weight's llama.cpp tensor name, and `rope_permute` is the row order llama.cpp's
converter gives LLaMA's Q and K weights (the adapter's rows follow it). Needs the ``gguf``
package.

>>> import jax, jax.numpy as jnp, lorax, lorax.llamacpp, tempfile, os, gguf
>>> fn = lambda p, x: x @ p["v"]
>>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, {"v": jnp.ones((4, 6))}, jnp.ones((1, 4)))
>>> out = lorax.llamacpp.save_adapter(os.path.join(tempfile.mkdtemp(), "a.gguf"), lp, {"v": "blk.0.attn_v.weight"})
>>> reader = gguf.GGUFReader(out)
>>> [tensor.name for tensor in reader.tensors], reader.fields["general.type"].contents()
(['blk.0.attn_v.weight.lora_a', 'blk.0.attn_v.weight.lora_b'], 'adapter')
"""

from lorax._src.io.llamacpp import Names as Names
from lorax._src.io.llamacpp import rope_permute as rope_permute
from lorax._src.io.llamacpp import save_adapter as save_adapter

__all__ = ["Names", "rope_permute", "save_adapter"]
