"""llama.cpp's LoRA adapter file: a GGUF with ``general.type = adapter`` and ``.lora_a``/``.lora_b`` tensors.

For a base tensor ``blk.N.attn_q.weight`` (ggml ``ne = [in, out]``, numpy ``[out, in]``) llama.cpp
reads ``blk.N.attn_q.weight.lora_a`` as numpy ``[rank, in]`` and ``.lora_b`` as ``[out, rank]``
and adds ``alpha / rank · B (A x)``, ``alpha`` being the file's one ``adapter.lora.alpha`` and
``rank`` each tensor's own. llama.cpp's converter stores LLaMA's Q and K weights with their rows
permuted for its rotary kernel; the adapter's ``lora_b`` rows get the same permutation.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lorax._src.adapter import Adapter
from lorax._src.initializers import makes_residual
from lorax._src.kinds import LoraWeight
from lorax._src.paths import unique_named_leaves
from lorax._src.records import real
from lorax._src.trainable import Trainable

#: lorax path -> llama.cpp base tensor name (``{i}``: the layer of an ``nn.scan`` stack), or a
#: function ``(path, layer index) -> name or None``.
Names = Mapping[str, str] | Callable[[str, tuple[int, ...]], "str | None"]

ROPE_PERMUTED = {"attn_q.weight": 0, "attn_k.weight": 1}  # tensor name suffix -> which of ``heads``


def rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for a LLaMA Q/K weight (or its LoRA B) ``[out, ...]``:
    within each head, the two rotary halves are interleaved.

    >>> rope_permute(np.arange(8)[:, None], heads=1).ravel().tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    out = rows.shape[0]
    if out % (2 * heads):
        raise ValueError(f"lorax.llamacpp: {out} rows do not split into {heads} heads of two rotary halves.")
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _tensor_name(names: Names, path: str, index: tuple[int, ...]) -> str | None:
    if callable(names):
        return names(path, index)
    template = names.get(path)
    return None if template is None else template.format(i=".".join(map(str, index)))


def _factors(names: Names, path: str, leaf: LoraWeight, heads: tuple[int, int] | None):
    """``(base tensor name, lora_a [r, in], lora_b [out, r])`` per layer of ``leaf``."""
    a = np.asarray(jax.device_get(leaf.a), np.float32)
    b = np.asarray(jax.device_get(leaf.b), np.float32)
    for index in np.ndindex(*a.shape[: len(leaf.stack_axes)]):
        name = _tensor_name(names, path, index)
        if name is None:
            raise ValueError(f"lorax.llamacpp: the name map gives no llama.cpp tensor for {path!r}"
                             f"{f' layer {index}' if index else ''}.")
        lora_a, lora_b = a[index].reshape(-1, leaf.rank).T, b[index].reshape(leaf.rank, -1).T
        suffix = next((s for s in ROPE_PERMUTED if name.endswith(s)), None)
        if heads is not None and suffix is not None:
            lora_b = rope_permute(lora_b, heads[ROPE_PERMUTED[suffix]])
        yield name, np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _lora_leaves(params: Any) -> list[tuple[str, LoraWeight]]:
    leaves = []
    for path, leaf in unique_named_leaves(params, "lorax.llamacpp.save_adapter"):
        if isinstance(leaf, Trainable):
            raise ValueError(f"lorax.llamacpp: {path!r} is trained in full; a llama.cpp adapter holds LoRA "
                             "factors only (merge it into the base model instead).")
        if not isinstance(leaf, Adapter):
            continue
        if type(leaf) is not LoraWeight:
            raise ValueError(f"lorax.llamacpp: {path!r} is a {type(leaf).__name__} ({leaf.kind}); llama.cpp "
                             "adapters are plain LoRA (merge it into the base model instead).")
        if makes_residual(leaf.init):
            raise ValueError(f"lorax.llamacpp: {path!r} was initialised with {leaf.init!r}, so its frozen base "
                             "is a residual, not the released weight llama.cpp loads; merge it instead.")
        if path.rsplit("/", 1)[-1] == "embedding":
            raise ValueError(f"lorax.llamacpp: {path!r} is an embedding table; only matmul weights are exported.")
        leaf.check(path)
        leaves.append((path, leaf))
    if not leaves:
        raise ValueError("lorax.llamacpp: params hold no LoraWeight to export.")
    return leaves


def save_adapter(path: str | os.PathLike, params: Any, names: Names, *, heads: tuple[int, int] | None = None,
                 arch: str = "llama") -> Path:
    """Write the LoRA adapters of ``params`` as a llama.cpp adapter GGUF at ``path``; returns it.

    ``names`` maps each adapted lorax path to the base model's llama.cpp tensor name: a dict of
    templates (``{i}`` is the layer of a stacked weight) or a function ``(path, index) -> name``.
    ``heads``: ``(n_head, n_head_kv)`` of a LLaMA-family model, whose ``attn_q``/``attn_k`` rows
    llama.cpp stores permuted for its rotary kernel; ``None`` leaves every row order as is.
    ``arch`` must equal the base model's ``general.architecture``. Per-weight scales that
    differ from the file's single alpha are folded into ``lora_b``. The file is written
    beside ``path`` and renamed over it: a failure leaves what was there.

    >>> import jax, jax.numpy as jnp, lorax, lorax.llamacpp, tempfile, os
    >>> fn = lambda p, x: x @ p["q"]
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, {"q": jnp.ones((4, 6))}, jnp.ones((1, 4)))
    >>> out = lorax.llamacpp.save_adapter(os.path.join(tempfile.mkdtemp(), "a.gguf"), lp, {"q": "blk.0.attn_v.weight"})
    >>> out.name
    'a.gguf'
    """
    try:
        from gguf import GGUFWriter
    except ImportError:
        raise ImportError("lorax.llamacpp needs the gguf package: pip install gguf") from None
    target = Path(path).absolute()
    if target.is_dir():
        raise ValueError(f"lorax.llamacpp: {str(target)!r} is a folder; pass the adapter file's path.")
    if heads is not None and (len(heads) != 2 or not all(isinstance(h, int) and h > 0 for h in heads)):
        raise ValueError(f"lorax.llamacpp: heads must be (n_head, n_head_kv), two positive ints; got {heads!r}.")
    tensors, alphas, owner = {}, {}, {}
    for leaf_path, leaf in _lora_leaves(params):
        alpha = real(leaf.scale * leaf.rank, f"lorax.llamacpp: alpha (scale x rank) of {leaf_path!r}", positive=True)
        for name, lora_a, lora_b in _factors(names, leaf_path, leaf, heads):
            if name in owner:
                raise ValueError(f"lorax.llamacpp: {owner[name]!r} and {leaf_path!r} both map to {name!r}.")
            owner[name] = leaf_path
            tensors[name], alphas[name] = (lora_a, lora_b), alpha
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(staging, arch=arch)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for name, (lora_a, lora_b) in tensors.items():
            writer.add_tensor(f"{name}.lora_a", lora_a)
            writer.add_tensor(f"{name}.lora_b", lora_b * np.float32(alphas[name] / alpha))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return target
