"""llama.cpp interop: `save_adapter` writes a LoRA adapter GGUF that llama.cpp loads (``--lora``)."""

from lorax._src.llamacpp import Names as Names
from lorax._src.llamacpp import rope_permute as rope_permute
from lorax._src.llamacpp import save_adapter as save_adapter

__all__ = ["Names", "rope_permute", "save_adapter"]
