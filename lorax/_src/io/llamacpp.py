"""llama.cpp's LoRA adapter file: a GGUF with ``general.type = adapter`` and ``.lora_a``/``.lora_b`` tensors.

For a base tensor ``blk.N.attn_q.weight`` (ggml ``ne = [in, out]``, numpy ``[out, in]``) llama.cpp
reads ``blk.N.attn_q.weight.lora_a`` as numpy ``[rank, in]`` and ``.lora_b`` as ``[out, rank]``
and adds ``alpha / rank · B (A x)``, ``alpha`` being the file's one ``adapter.lora.alpha`` and
``rank`` each tensor's own. llama.cpp's converter stores LLaMA's Q and K weights with their rows
permuted for its rotary kernel; the adapter's ``lora_b`` rows get the same permutation.
"""

from __future__ import annotations

import collections
import numbers
import os
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lorax._src.io.files import atomic_file
from lorax._src.kinds import LoraWeight
from lorax._src.kinds.adapter import Adapter
from lorax._src.kinds.initializers import makes_residual
from lorax._src.paths import unique_named_leaves
from lorax._src.trainable import Trainable
from lorax._src.validate import real

Names = Mapping[str, str] | Callable[[str, tuple[int, ...]], "str | None"]
"""How `save_adapter` names the base model's tensors: a dict from each adapted lorax path to its
llama.cpp tensor name, or a function ``(path, layer index) -> name or None``.

In a dict, ``{i}`` (the only field a template may use) is the layer of a stacked weight (an
``nn.scan`` stack), giving one tensor per layer; adapted paths the dict does not list are
refused. llama.cpp's names are ``blk.N.attn_q.weight``, ``blk.N.ffn_down.weight`` and the like
(``gguf-dump MODEL.gguf`` lists a model's).

>>> import jax, jax.numpy as jnp, lorax, lorax.llamacpp, tempfile, os, gguf
>>> fn = lambda p, x: jax.lax.scan(lambda h, w: (h @ w, None), x, p["layers"]["v"])[0]  # two stacked layers
>>> base = {"layers": {"v": jnp.ones((2, 4, 4))}}
>>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
>>> names = {"layers/v": "blk.{i}.attn_v.weight"}  # or lambda path, index: f"blk.{index[0]}.attn_v.weight"
>>> out = lorax.llamacpp.save_adapter(os.path.join(tempfile.mkdtemp(), "a.gguf"), lp, names)
>>> [tensor.name for tensor in gguf.GGUFReader(out).tensors]
['blk.0.attn_v.weight.lora_a', 'blk.0.attn_v.weight.lora_b', 'blk.1.attn_v.weight.lora_a', 'blk.1.attn_v.weight.lora_b']
"""

ROPE_PERMUTED = {"attn_q.weight": 0, "attn_k.weight": 1}  # tensor name suffix -> which of ``heads``
WHO = "lorax.llamacpp.save_adapter"


def rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for a LLaMA Q/K weight (or its LoRA B) ``[out, ...]``:
    within each head, the two rotary halves are interleaved.

    >>> import numpy as np, lorax.llamacpp
    >>> lorax.llamacpp.rope_permute(np.arange(8)[:, None], heads=1).ravel().tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    out = rows.shape[0]
    if out % (2 * heads):
        raise ValueError(f"lorax.llamacpp: {out} rows do not split into {heads} heads of two rotary halves.")
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _check_names(names: Any) -> None:
    """``names`` must be a function or a dict of str paths to templates using only ``{i}``."""
    if callable(names):
        return
    if not isinstance(names, Mapping):
        raise TypeError(f"{WHO}: names must be a dict {{lorax path: llama.cpp tensor name}} or a function "
                        f"(path, layer index) -> name, got {type(names).__name__}.")
    for path, template in names.items():
        if not isinstance(path, str) or not isinstance(template, str) or not template:
            raise TypeError(f"{WHO}: names must map str lorax paths to non-empty str tensor names; got "
                            f"names[{path!r}] = {template!r}.")
        try:
            fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                      if field is not None]
        except ValueError as err:
            raise ValueError(f"{WHO}: names[{path!r}] = {template!r} is not a valid template ({err}).") from None
        if any(f != ("i", "", None) for f in fields):
            raise ValueError(f"{WHO}: names[{path!r}] = {template!r} uses {{{fields[0][0]}}}; a template may use "
                             "only {i}, the layer of a stacked weight.")


def _tensor_name(names: Names, path: str, index: tuple[int, ...]) -> str | None:
    where = f"{path!r}{f' layer {index}' if index else ''}"
    if callable(names):
        name = names(path, index)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"{WHO}: names({path!r}, {index}) returned {name!r}; it must return a non-empty str "
                            "tensor name, or None.")
        return name
    template = names.get(path)
    if template is None:
        return None
    stacked = "{i}" in template
    if stacked != bool(index):
        raise ValueError(f"{WHO}: names[{path!r}] = {template!r} for {where}: "
                         + ("a stacked weight needs {i} in its template (one tensor per layer)." if index else
                            "{i} is the layer of a stacked weight, and this weight is not stacked."))
    return template.format(i=".".join(map(str, index)))


def _check_heads(heads: Any) -> tuple[int, int] | bool:
    """``heads`` as two positive ints (NumPy ints pass), or False; anything else refused."""
    if heads is False:
        return False
    if isinstance(heads, (tuple, list)) and len(heads) == 2 and all(
            isinstance(h, numbers.Integral) and not isinstance(h, (bool, np.bool_)) and int(h) > 0 for h in heads):
        return int(heads[0]), int(heads[1])
    raise ValueError(f"{WHO}: heads must be (n_head, n_head_kv), two positive ints, or False; got {heads!r}.")


def _permuted(lora_b: np.ndarray, heads: tuple[int, int] | bool | None, name: str, where: str) -> np.ndarray:
    """``lora_b`` with its rows in llama.cpp's order for the base tensor ``name``."""
    suffix = next((s for s in ROPE_PERMUTED if name.endswith(s)), None)
    if suffix is None or heads is False:
        return lora_b
    if not isinstance(heads, tuple):
        raise ValueError(f"{WHO}: {where} maps to {name!r}, whose rows llama.cpp's converter permutes for "
                         "LLaMA-family models: pass heads=(n_head, n_head_kv) to permute lora_b alike, or "
                         "heads=False for an architecture that stores them unpermuted.")
    count = heads[ROPE_PERMUTED[suffix]]
    if lora_b.shape[0] % (2 * count):
        raise ValueError(f"{WHO}: {where} maps to {name!r} with lora_b of shape {lora_b.shape} [out, rank]: "
                         f"{lora_b.shape[0]} rows do not split into {count} heads of two rotary halves "
                         f"(heads={heads}).")
    return rope_permute(lora_b, count)


def _factors(names: Names, path: str, leaf: LoraWeight, heads: tuple[int, int] | bool | None):
    """``(base tensor name, lora_a [r, in], lora_b [out, r])`` per layer of ``leaf``."""
    a = np.asarray(jax.device_get(leaf.a), np.float32)
    b = np.asarray(jax.device_get(leaf.b), np.float32)
    for index in np.ndindex(*a.shape[: len(leaf.stack_axes)]):
        where = f"{path!r}{f' layer {index}' if index else ''}"
        name = _tensor_name(names, path, index)
        if name is None:
            raise ValueError(f"lorax.llamacpp: the name map gives no llama.cpp tensor for {where}.")
        lora_a, lora_b = a[index].reshape(-1, leaf.rank).T, b[index].reshape(leaf.rank, -1).T
        lora_b = _permuted(lora_b, heads, name, where)
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


def save_adapter(path: str | os.PathLike, params: Any, names: Names, *,
                 heads: tuple[int, int] | bool | None = None, arch: str = "llama", overwrite: bool = False) -> Path:
    """Write the LoRA adapters of ``params`` as a llama.cpp adapter GGUF at ``path``; returns it.

    ``names`` maps each adapted lorax path to the base model's llama.cpp tensor name: a dict of
    templates (``{i}``, the only field, is the layer of a stacked weight) or a function
    ``(path, index) -> name``. ``heads``: ``(n_head, n_head_kv)`` of a LLaMA-family model,
    whose ``attn_q``/``attn_k`` rows llama.cpp stores permuted for its rotary kernel, or
    ``False`` for an architecture that keeps them unpermuted; needed (None is refused) when
    ``names`` gives an ``attn_q`` or ``attn_k`` tensor. ``arch`` must equal the base model's
    ``general.architecture``. Per-weight scales that differ from the file's single alpha are
    folded into ``lora_b``. An existing file at ``path`` is refused unless ``overwrite``.
    The file is written beside ``path``, synced and renamed into place: a failure leaves
    what was there; a new file gets the permissions ``open(path, "w")`` gives, a replaced
    one keeps its own.

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
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{WHO}: path must be a str or os.PathLike, got {type(path).__name__}.")
    target = Path(path).absolute()
    if target.is_dir():
        raise ValueError(f"lorax.llamacpp: {str(target)!r} is a folder; pass the adapter file's path.")
    if not isinstance(overwrite, bool):
        raise TypeError(f"{WHO}: overwrite must be True or False, got {overwrite!r}.")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{WHO}: arch must be the base model's general.architecture, a non-empty str such as "
                         f"'llama'; got {arch!r}.")
    heads = None if heads is None else _check_heads(heads)
    _check_names(names)
    tensors, alphas, owner = {}, {}, {}
    for leaf_path, leaf in _lora_leaves(params):
        alpha = real(leaf.scale * leaf.rank, f"lorax.llamacpp: alpha (scale x rank) of {leaf_path!r}", positive=True)
        for name, lora_a, lora_b in _factors(names, leaf_path, leaf, heads):
            if name in owner:
                raise ValueError(f"lorax.llamacpp: {owner[name]!r} and {leaf_path!r} both map to {name!r}.")
            owner[name] = leaf_path
            tensors[name], alphas[name] = (lora_a, lora_b), alpha
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    with atomic_file(target, WHO, overwrite=overwrite) as staging:
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
    return target
