"""Hugging Face PEFT interop: `save_peft` / `load_peft` and built-in module maps.

A PEFT adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``) is what
``peft.PeftModel.from_pretrained`` reads and ``save_pretrained`` writes; a `Mapping` (`LLAMA`,
`GPT2` or your own) names the torch module of each lorax path. No torch is needed.

>>> import jax, jax.numpy as jnp, lorax, lorax.peft, tempfile, json
>>> fn = lambda p, x: x @ p["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
>>> base = {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((4, 4))}}}}}
>>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
>>> folder = lorax.peft.save_peft(tempfile.mkdtemp(), lp, lorax.peft.LLAMA)
>>> config = json.loads((folder / "adapter_config.json").read_text())
>>> config["r"], config["target_modules"]  # PEFT matches module names by suffix
(2, ['q_proj'])
"""

from lorax._src.io.peft_folder import GPT2 as GPT2
from lorax._src.io.peft_folder import LLAMA as LLAMA
from lorax._src.io.peft_folder import Mapping as Mapping
from lorax._src.io.peft_folder import module_name as module_name
from lorax._src.io.verbs import load_peft as load_peft
from lorax._src.io.verbs import save_peft as save_peft

__all__ = ["GPT2", "LLAMA", "Mapping", "load_peft", "module_name", "save_peft"]
