"""What every PEFT adapter folder shares, whatever its kind: how lorax paths name torch modules
(`Mapping`, `LLAMA`, `GPT2`), the folder's files and their atomic write, full-weight tensors
(``modules_to_save``), the base fingerprints lorax keeps in the weights file's metadata, and the
blank nodes a folder's tensors fill (`blank_nodes`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lorax._src.bases.quantized import FROZEN_BASES
from lorax._src.config import LoraConfig
from lorax._src.init import init
from lorax._src.io.files import staged_folder
from lorax._src.io.peft_config import CONFIG_FILE
from lorax._src.io.records import base_mismatch, is_fingerprint
from lorax._src.kinds.adapter import Adapter
from lorax._src.paths import named_leaves
from lorax._src.trees import _map

PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_KEY = "lorax_base"  # safetensors metadata: JSON {module: fingerprint of its base weight}; PEFT ignores it

Mapping = Callable[[str, tuple[int, ...]], "str | None"] | Sequence[tuple[str, str]]
r"""How lorax paths name PEFT's torch modules: a sequence of ``(regex, template)`` pairs or a
function ``(path, layer index) -> module name or None``.

Each regex is fully matched against the lorax path (keys joined with ``/``); the first that
matches gives the module name by formatting ``template`` with the regex's named groups, and
``{i}``, when the regex has no group ``i``, with the layer's index in the stack of an
``nn.scan``-ed weight. Paths that no entry matches have no module (`save_peft` refuses an
adapter there). `LLAMA` and `GPT2` are built in.

>>> import lorax.peft
>>> mapping = [(r"layers_(?P<i>\d+)/(?P<m>q|v)/kernel", "model.layers.{i}.self_attn.{m}_proj")]
>>> lorax.peft.module_name(mapping, "layers_2/q/kernel", ())
'model.layers.2.self_attn.q_proj'
>>> lorax.peft.module_name([(r"layers/(?P<m>q|v)/kernel", "model.layers.{i}.{m}_proj")], "layers/v/kernel", (5,))
'model.layers.5.v_proj'
>>> lorax.peft.module_name(lambda path, index: "model." + path.replace("/", "."), "q/kernel", ())
'model.q.kernel'
"""

LLAMA: Mapping = (
    (r"(?:.*/)?layers(?:_(?P<i>\d+))?/self_attn/(?P<m>[qkvo])_proj/kernel", "model.layers.{i}.self_attn.{m}_proj"),
    (r"(?:.*/)?layers(?:_(?P<i>\d+))?/mlp/(?P<m>gate|up|down)_proj/kernel", "model.layers.{i}.mlp.{m}_proj"),
    (r"(?:.*/)?layers(?:_(?P<i>\d+))?/(?P<m>input_layernorm|post_attention_layernorm)/scale", "model.layers.{i}.{m}"),
    (r"(?:.*/)?embed_tokens/embedding", "model.embed_tokens"),
    (r"(?:.*/)?norm/scale", "model.norm"),
    (r"(?:.*/)?lm_head/kernel", "lm_head"),
)
"""The `Mapping` of Hugging Face's LLaMA family (Llama, Mistral, Qwen2, SmolLM, ...) laid out as
in transformers' Flax models: ``layers_N`` (or one ``layers`` stack of ``nn.scan``) holding
``self_attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj`` and the two layer norms, then
``embed_tokens``, the final ``norm`` and ``lm_head``, under any prefix.

>>> import lorax.peft
>>> lorax.peft.module_name(lorax.peft.LLAMA, "params/model/layers_3/self_attn/q_proj/kernel", ())
'model.layers.3.self_attn.q_proj'
>>> lorax.peft.module_name(lorax.peft.LLAMA, "model/layers/mlp/down_proj/kernel", (5,))  # layer 5 of a stack
'model.layers.5.mlp.down_proj'
>>> lorax.peft.module_name(lorax.peft.LLAMA, "params/lm_head/kernel", ())
'lm_head'
"""
GPT2: Mapping = (
    (r"(?:.*/)?h(?:_(?P<i>\d+))?/attn/(?P<m>c_attn|c_proj)/kernel", "transformer.h.{i}.attn.{m}"),
    (r"(?:.*/)?h(?:_(?P<i>\d+))?/mlp/(?P<m>c_fc|c_proj)/kernel", "transformer.h.{i}.mlp.{m}"),
    (r"(?:.*/)?wte/embedding", "transformer.wte"),
)
"""The `Mapping` of Hugging Face's GPT-2 laid out as in transformers' Flax model: ``h_N`` (or one
``h`` stack of ``nn.scan``) holding ``attn/{c_attn,c_proj}`` and ``mlp/{c_fc,c_proj}``, and
the token embedding ``wte``, under any prefix.

>>> import lorax.peft
>>> lorax.peft.module_name(lorax.peft.GPT2, "params/transformer/h_0/attn/c_attn/kernel", ())
'transformer.h.0.attn.c_attn'
>>> lorax.peft.module_name(lorax.peft.GPT2, "transformer/h/mlp/c_fc/kernel", (11,))
'transformer.h.11.mlp.c_fc'
"""

def module_name(mapping: Mapping, path: str, index: tuple[int, ...]) -> str | None:
    """The torch module name of lorax ``path`` (layer ``index`` of a stack), or None.

    >>> import lorax.peft
    >>> lorax.peft.module_name(lorax.peft.LLAMA, "model/layers_0/self_attn/v_proj/kernel", ())
    'model.layers.0.self_attn.v_proj'
    >>> lorax.peft.module_name(lorax.peft.LLAMA, "model/layers_0/self_attn/rotary", ()) is None
    True
    """
    if callable(mapping):
        return mapping(path, index)
    for pattern, template in mapping:
        match = re.fullmatch(pattern, path)
        if match:
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            if "i" not in groups and index:
                groups["i"] = ".".join(map(str, index))
            try:
                return template.format(**groups)
            except KeyError:  # a per-layer template asked without a layer
                return None
    return None


def _require_base(path: str, leaf: Adapter) -> None:
    """Refuse an adapter without its frozen base, whose fingerprint the folder records."""
    if not isinstance(leaf.w, (jax.Array, np.ndarray, *FROZEN_BASES)):
        raise TypeError(f"lorax.peft: the {type(leaf).__name__} at {path!r} holds {type(leaf.w).__name__} as its "
                        "frozen base w, not an array; export the whole tree (lorax.combine(trainable, frozen)).")


def _write_folder(target: Path, config: str, tensors: dict, metadata: dict[str, str]) -> None:
    """Write the adapter into a staged copy of ``target`` and swap it in (`files.staged_folder`):
    a crash leaves the old or the new adapter. Other files of an existing folder (a README, say)
    are carried over."""
    with staged_folder(target, "lorax.peft.save_peft") as staged:
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # hard links to the old adapter's files: replace, never write through
            (staged / name).unlink(missing_ok=True)
        save_file(tensors, staged / WEIGHTS_FILE, metadata={"format": "pt", **metadata})
        (staged / CONFIG_FILE).write_text(config)


def _check_mapping(mapping: Any) -> None:
    if callable(mapping):
        return
    if not isinstance(mapping, (list, tuple)) or not all(
            isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in mapping):
        raise TypeError("lorax.peft: mapping must be a function (path, layer) -> module name or a sequence "
                        f"of (path regex, module template) string pairs, got {mapping!r:.200}.")
    for pattern, _ in mapping:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"lorax.peft: mapping regex {pattern!r} is not valid ({err}).") from None


def _full_tensors(mapping: Mapping, path: str, value: np.ndarray):
    """``(module, torch tensor name, value)`` for a leaf trained fully (``modules_to_save``).

    A kernel is transposed to torch's [out, in]; a leaf whose module name needs a layer is
    split along its first (stacked) axis."""
    param = "bias" if path.endswith("/bias") else "weight"
    stacked = module_name(mapping, path, ()) is None
    for index, layer in (enumerate(value) if stacked else [(None, value)]):
        module = module_name(mapping, path, () if index is None else (index,))
        if module is None:
            raise ValueError(f"lorax.peft: the mapping gives no torch module for the Trainable leaf {path!r}.")
        yield module, f"{module}.{param}", layer.T if path.endswith("/kernel") else layer


def _recorded_bases(file: Path) -> dict[str, Any]:
    """The base fingerprints `save_peft` wrote in ``file``'s metadata, by module; {} if none."""
    try:
        with safe_open(file, framework="numpy") as f:
            text = (f.metadata() or {}).get(BASE_KEY)
        recorded = None if text is None else json.loads(text)
    except (OSError, ValueError) as err:
        raise ValueError(f"lorax.peft: {file}: the {BASE_KEY!r} metadata is unreadable ({err}).") from None
    if recorded is not None and not (isinstance(recorded, dict) and all(isinstance(v, dict)
                                                                         for v in recorded.values())):
        raise ValueError(f"lorax.peft: {file}: the {BASE_KEY!r} metadata must map module names to base "
                         f"fingerprints, got {recorded!r:.200}.")
    return recorded or {}


def _unlike_base(recorded: dict, module: str, where: str, matrix: jax.Array, fmt: str | None,
                 file: Path) -> list[str]:
    """A line naming ``module`` if its base ``matrix`` differs from its recorded fingerprint."""
    if module not in recorded:
        return []
    if not is_fingerprint(recorded[module], matrix.size):
        raise ValueError(f"lorax.peft: {file}: {BASE_KEY}[{module!r}] is not a base fingerprint of a "
                         f"{tuple(matrix.shape)} weight, got {recorded[module]!r:.200}; the file is damaged.")
    problem = base_mismatch(recorded[module], matrix, fmt)
    return [f"  {module} ({where}): {problem}"] if problem else []


def claim(owner: dict[str, str], name: str, path: str, index: tuple = ()) -> None:
    """Record that ``path`` (layer ``index`` of a stack) writes torch name ``name``; a name the
    mapping already gave another weight or layer is refused, naming both."""
    where = f"{path!r}{f' layer {index}' if index else ''}"
    if name in owner:
        raise ValueError(f"lorax.peft: the mapping gives {owner[name]} and {where} one torch name "
                         f"{name!r}; each weight (and layer) needs its own module.")
    owner[name] = where


def blank_nodes(config: LoraConfig, fn: Callable, params: Any, args: tuple, kwargs: dict) -> Any:
    """``params`` with the adapters ``config`` makes of them laid out by one abstract trace (`lorax.init`
    under `jax.eval_shape`: no factor is drawn, no norm of the base computed), each over its real
    frozen base ``w`` with zero trained arrays (NumPy), for a folder's tensors to fill; every other
    leaf is ``params``' own. A kind's shared arrays (`shared_field`) stay abstract: the folder holds them.
    """
    template = jax.eval_shape(lambda p: init(jax.random.key(0), config, fn, p, *args, **kwargs), params)
    real = dict(named_leaves(params))

    def restore(name, leaf):
        if not isinstance(leaf, Adapter):
            return real[name]
        return leaf.replace(w=real[name], **{n: np.zeros(x.shape, x.dtype) for n, x in leaf.trained().items()})

    return _map(restore, template)
