"""Hugging Face PEFT interop: `save_peft` / `load_peft` and built-in module maps."""

from lorax._src.peft import GPT2 as GPT2
from lorax._src.peft import LLAMA as LLAMA
from lorax._src.peft import Mapping as Mapping
from lorax._src.peft import load_peft as load_peft
from lorax._src.peft import module_name as module_name
from lorax._src.peft import save_peft as save_peft

__all__ = ["GPT2", "LLAMA", "Mapping", "load_peft", "module_name", "save_peft"]
