"""Hugging Face PEFT's adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written and read through safetensors' numpy API: no torch at run time. A lorax ``a``
[*contracted, r] becomes ``lora_A.weight`` [r, in] and ``b`` [r, *outputs] becomes
``lora_B.weight`` [out, r], multi-axis kernels flattened row-major; each layer of an
``nn.scan`` stack becomes its own module. Scaling travels as ``r`` / ``lora_alpha``.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from lorax._src.bases.quantized import dense, format_of
from lorax._src.config import LoraConfig
from lorax._src.io import peft_kinds
from lorax._src.io.files import as_folder
from lorax._src.io.peft_config import CONFIG_FILE, pattern_value, read_config, read_json, skip_untargeted
from lorax._src.io.peft_folder import (
    BASE_KEY,
    PREFIX,
    WEIGHTS_FILE,
    Mapping,
    _check_mapping,
    _full_tensors,
    _recorded_bases,
    _require_base,
    _unlike_base,
    _write_folder,
    blank_nodes,
    claim,
    module_name,
)
from lorax._src.io.records import fingerprint
from lorax._src.kinds import DoraWeight, LoraWeight
from lorax._src.kinds.adapter import KINDS, RANK, Adapter, as_matrices
from lorax._src.kinds.initializers import makes_residual
from lorax._src.paths import named_leaves, unique_named_leaves
from lorax._src.sharding import place_factors
from lorax._src.trainable import Trainable
from lorax._src.trees import _map
from lorax._src.validate import real

MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, [out_features]
PART_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}


def _suffixes(lw_path: str) -> tuple[str, str]:
    if lw_path.rsplit("/", 1)[-1] == "embedding":  # a flax nn.Embed table
        return ".lora_embedding_A", ".lora_embedding_B"
    return ".lora_A.weight", ".lora_B.weight"


def _layers(lw: Adapter):
    """``(stack index, {field: 2-D or 1-D array})`` per layer: ``a`` [in, r], ``b`` [r, out]
    and DoRA's ``m`` [out]."""
    arrays = {n: np.asarray(jax.device_get(x)) for n, x in lw.trained().items()}
    shapes = {"a": (-1, lw.rank), "b": (lw.rank, -1), "m": (-1,)}
    for index in np.ndindex(*arrays["a"].shape[: len(lw.stack_axes)]):
        yield index, {n: x[index].reshape(shapes[n]) for n, x in arrays.items()}


def relative_to_original(lw: LoraWeight, initial: LoraWeight) -> LoraWeight:
    """A PiSSA/OLoRA adapter as a plain LoRA of twice the rank on the *original* base.

    Its frozen base is ``W - s·a₀·b₀`` (``a₀``, ``b₀`` its factors at initialisation), so on
    ``W`` the same weight is ``W + s·[a, a₀]·[b; -b₀]`` (PEFT's conversion)."""
    return lw.replace(a=jnp.concatenate([lw.a, initial.a.astype(lw.a.dtype)], axis=lw.axis("a", RANK)),
                      b=jnp.concatenate([lw.b, -initial.b.astype(lw.b.dtype)], axis=lw.axis("b", RANK)))


def save_peft(directory: str | Path, params: Any, mapping: Mapping, *, base_model_name_or_path: str = "",
              task_type: str = "CAUSAL_LM", initial: Any = None) -> Path:
    """`lorax.peft.save_peft` of a tree of single adapters (`lorax._src.io.verbs.save_peft`, whose docstring
    tells)."""
    target = as_folder(directory, "lorax.peft.save_peft", must_exist=False)
    _check_mapping(mapping)
    for name, value in (("base_model_name_or_path", base_model_name_or_path), ("task_type", task_type)):
        if not isinstance(value, str) and not (name == "task_type" and value is None):
            raise TypeError(f"lorax.peft.save_peft: {name} must be a string, got {value!r} ({type(value).__name__}).")
    tensors, ranks, alphas, saved, owner, dropouts, bases = {}, {}, {}, set(), {}, set(), {}
    starts = dict(named_leaves(initial)) if initial is not None else None
    kinds = {type(leaf) for _, leaf in named_leaves(params) if isinstance(leaf, Adapter)}
    if len(kinds) == 1 and next(iter(kinds)).peft is not None and starts is None:
        return peft_kinds.save(target, params, mapping, next(iter(kinds)), task_type=task_type,
                               base_model_name_or_path=base_model_name_or_path)
    if len(kinds) > 1 or not kinds <= {LoraWeight, DoraWeight} or (starts is not None and kinds != {LoraWeight}):
        raise ValueError(f"lorax.peft: cannot export adapters of kinds {sorted(k.__name__ for k in kinds)}"
                         f"{' relative to their initial factors' if starts is not None else ''}: one PEFT folder "
                         "holds adapters of one kind (and PEFT converts only plain LoRA ones).")
    residuals = [p for p, leaf in named_leaves(params) if isinstance(leaf, Adapter) and makes_residual(leaf.init)]
    if residuals and starts is None:
        raise ValueError(f"lorax.peft: {residuals[0]!r} was initialised with PiSSA or OLoRA, so its frozen "
                         "base is a residual of the original weight; pass initial=lorax.split(params_at_init)[0] "
                         "to export it relative to the original base, as PEFT expects.")

    for path, leaf in unique_named_leaves(params, "lorax.peft.save_peft"):
        if isinstance(leaf, Trainable):
            for module, name, value in _full_tensors(mapping, path, np.asarray(jax.device_get(leaf.value))):
                claim(owner, name, path)
                tensors[PREFIX + name] = np.ascontiguousarray(value)
                saved.add(module)
            continue
        if not isinstance(leaf, Adapter):
            continue
        _require_base(path, leaf)
        leaf.check(path)
        start = None
        if starts is not None and makes_residual(leaf.init) and isinstance(leaf, LoraWeight):
            start = starts.get(path)
            if not isinstance(start, LoraWeight):
                raise ValueError(f"lorax.peft: `initial` has no adapter at {path!r}; pass the trainable "
                                 "tree saved right after lorax.init.")
        matrices = _base_matrices(leaf, start)
        fmt = format_of(leaf.w)
        if start is not None and isinstance(leaf, LoraWeight):
            leaf = relative_to_original(leaf, start)
        alpha = real(leaf.scale * leaf.rank, f"lorax.peft: lora_alpha (scale x rank) of {path!r}", positive=True)
        suffix_a, suffix_b = _suffixes(path)
        for index, arrays in _layers(leaf):
            module = module_name(mapping, path, index)
            if module is None:
                raise ValueError(f"lorax.peft: the mapping gives no torch module for {path!r}"
                                 f"{f' layer {index}' if index else ''}.")
            claim(owner, module, path, index)
            tensors[PREFIX + module + suffix_a] = np.ascontiguousarray(arrays["a"].T)
            tensors[PREFIX + module + suffix_b] = np.ascontiguousarray(arrays["b"].T)
            if "m" in arrays:
                tensors[PREFIX + module + MAGNITUDE] = np.ascontiguousarray(arrays["m"])
            ranks[module], alphas[module] = leaf.rank, alpha
            bases[module] = fingerprint(matrices[index], fmt)
        dropouts.add(leaf.dropout)
    if not ranks:
        raise ValueError("lorax.peft: params hold no LoraWeight to export.")
    if len(dropouts) > 1:
        raise ValueError(f"lorax.peft: the adapters have dropout rates {sorted(dropouts)}; a PEFT folder holds one.")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for m, a in alphas.items() if ranks[m] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != alpha},
        "fan_in_fan_out": False, "bias": "none", "modules_to_save": sorted(saved) or None,
        "use_dora": kinds == {DoraWeight},
        "lora_dropout": dropouts.pop() if dropouts else 0.0, "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    _write_folder(target, json.dumps(config, indent=2, sort_keys=True),
                  {k: v.astype(np.float32) if v.dtype.kind == "V" else v for k, v in tensors.items()},
                  {BASE_KEY: json.dumps(bases, sort_keys=True)})
    return target


def _base_matrices(leaf: Adapter, initial: LoraWeight | None) -> jax.Array:
    """The frozen base of ``leaf`` as ``[*stack, in, out]`` matrices (dequantized); with ``initial``
    (a PiSSA/OLoRA adapter's factors at init), the original weight its residual was made from."""
    m = as_matrices(dense(leaf.w), leaf.a_axes, leaf.b_axes, leaf.stack_axes)
    if initial is None:
        return m
    stack, (fan_in, fan_out) = m.shape[:-2], m.shape[-2:]
    a0 = jnp.asarray(initial.a, jnp.float32).reshape(*stack, fan_in, -1)
    b0 = jnp.asarray(initial.b, jnp.float32).reshape(*stack, -1, fan_out)
    return m.astype(jnp.float32) + leaf.scale * (a0 @ b0)


def _check_ranks(modules: dict, config: dict) -> None:
    """Each module holds lora_A [r, in] and lora_B [out, r] with the rank the config gives it (PEFT refuses others)."""
    for module, parts in sorted(modules.items()):
        pair = {k: v for k, v in parts.items() if k in "AB"}  # DoRA's magnitude ("M") is checked on use
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"lorax.peft: {WEIGHTS_FILE}: module {module!r} has no {missing} tensor "
                             f"(it has {sorted(PART_NAMES[k] for k in parts)}).")
        want = pattern_value(config["rank_pattern"], module, config["r"])
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != want or B.shape[1] != want:
            raise ValueError(f"lorax.peft: {module!r}: lora_A {A.shape} / lora_B {B.shape} do not hold rank {want} "
                             f"(r={config['r']}{' and rank_pattern' if config['rank_pattern'] else ''} in "
                             f"{CONFIG_FILE}); PEFT refuses such an adapter.")


def is_bank_folder(directory: Path) -> bool:
    """Whether ``directory`` holds no adapter of its own but adapters in sub-folders (PEFT's
    multi-adapter layout)."""
    return not (directory / CONFIG_FILE).is_file() and any((p / CONFIG_FILE).is_file() for p in directory.iterdir())


def load_peft(directory: str | Path, fn: Callable, params: Any, *args, mapping: Mapping, check_base: bool = True,
              **kwargs) -> Any:
    """`lorax.peft.load_peft` of a folder of one adapter (`lorax._src.io.verbs.load_peft`, whose docstring
    tells)."""
    directory = as_folder(directory, "lorax.peft.load_peft", must_exist=True)
    _check_mapping(mapping)
    if not callable(fn):
        raise TypeError(f"lorax.peft.load_peft: fn must be the model function (params, *args) -> output, "
                        f"got {type(fn).__name__}.")
    if not isinstance(check_base, bool):
        raise TypeError(f"lorax.peft.load_peft: check_base must be True or False, got {check_base!r}.")
    raw = read_json(directory)
    kind = peft_kinds.kind_of(raw.get("peft_type"))
    if kind is not None:
        return peft_kinds.load(directory, raw, kind, fn, params, args, kwargs, mapping, check_base)
    if raw.get("peft_type") != "LORA":
        types = sorted(["LORA", *(k.peft.peft_type for k in KINDS.values() if k.peft is not None)])
        raise ValueError(f"lorax.peft: {directory / CONFIG_FILE}: peft_type is {raw.get('peft_type')!r}; lorax "
                         f"reads {types}.")
    config = read_config(directory)
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"lorax.peft: {directory / WEIGHTS_FILE} is missing or corrupt: {err}") from None
    recorded = _recorded_bases(directory / WEIGHTS_FILE) if check_base else {}
    modules: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    full: dict[str, np.ndarray] = {}  # modules_to_save tensors by torch name
    saved = config.get("modules_to_save") or []
    for key, value in tensors.items():
        match = re.fullmatch(r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                             r"lora_magnitude_vector)", key)
        if key.startswith(PREFIX) and match:
            part = "M" if "magnitude" in match.group(2) else "A" if "A" in match.group(2) else "B"
            modules[match.group(1)[len(PREFIX):]][part] = value
        elif key.startswith(PREFIX) and any(key.rsplit(".", 1)[0].endswith(m) for m in saved):
            full[key[len(PREFIX):]] = value
        else:
            raise ValueError(f"lorax.peft: unexpected tensor {key!r}: keys are "
                             f"'{PREFIX}<module>.lora_A.weight' and the like, or modules_to_save.")
    _check_ranks(modules, config)
    skip_untargeted(config, modules, directory / CONFIG_FILE, stacklevel=3)

    names = [name for name, leaf in named_leaves(params) if hasattr(leaf, "shape")]
    targets, rank_of = {}, {}
    for name in names:
        for index in ((), (0,)):
            module = module_name(mapping, name, index)
            if module in modules:
                targets[name] = module
                rank_of[name] = modules[module]["A"].shape[0]
    if not targets:
        raise ValueError(f"lorax.peft: no weight of the base maps to the adapter's modules "
                         f"{sorted(modules)[:5]}...; wrong base or mapping.")
    dora = bool(config.get("use_dora"))
    lp = blank_nodes(LoraConfig(rank=config["r"], targets=[re.escape(n) for n in targets],
                                rank_pattern={re.escape(n): k for n, k in rank_of.items()},
                                dropout=float(config.get("lora_dropout") or 0.0), use_dora=dora),
                     fn, params, args, kwargs)
    claimed: set[str] = set()
    unlike: list[str] = []  # base weights unlike the recorded fingerprints

    def fill(name, leaf):
        if not isinstance(leaf, (LoraWeight, DoraWeight)):
            return leaf
        a, b = leaf.a, leaf.b  # blank: every layer is filled below
        m = leaf.m if isinstance(leaf, DoraWeight) else None
        stack, r = a.shape[: len(leaf.stack_axes)], leaf.rank
        want_a, want_b = (r, math.prod(a.shape[len(stack):-1])), (math.prod(b.shape[len(stack) + 1:]), r)
        scales = set()
        matrices = as_matrices(dense(leaf.w), leaf.a_axes, leaf.b_axes, leaf.stack_axes) if recorded else None
        fmt = format_of(leaf.w)
        for index in np.ndindex(*stack):
            module = module_name(mapping, name, index)
            if module not in modules:
                raise ValueError(f"lorax.peft: the adapter has no tensors for {module!r} ({name!r} layer {index}).")
            claimed.add(module)
            if matrices is not None:
                where = f"{name!r}{f' layer {index}' if index else ''}"
                unlike.extend(_unlike_base(recorded, module, where, matrices[index], fmt, directory / WEIGHTS_FILE))
            A, B = modules[module]["A"], modules[module]["B"]
            if A.shape != want_a or B.shape != want_b:
                raise ValueError(f"lorax.peft: {module!r}: lora_A {A.shape} / lora_B {B.shape} do not fit "
                                 f"{name!r} {tuple(leaf.w.shape)}; expected {want_a} / {want_b}.")
            a[index], b[index] = A.T.reshape(a[index].shape), B.T.reshape(b[index].shape)
            if m is not None:
                M = modules[module].get("M")
                if M is None or M.shape != (want_b[0],):
                    raise ValueError(f"lorax.peft: {module!r}: use_dora is set but lora_magnitude_vector is "
                                     f"{'missing' if M is None else M.shape}; expected ({want_b[0]},).")
                m[index] = M.reshape(m[index].shape)
            alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
            scales.add(alpha / (math.sqrt(r) if config.get("use_rslora") else r))
        if len(scales) > 1:
            raise ValueError(f"lorax.peft: the layers of {name!r} have different scales {sorted(scales)}; "
                             "one stacked weight holds one scale.")
        filled = {"a": a, "b": b} | ({"m": m} if m is not None else {})
        return place_factors(leaf.replace(scale=scales.pop(),
                                          **{n: jnp.asarray(x, getattr(leaf, n).dtype) for n, x in filled.items()}))

    def fill_full(name, leaf):
        if isinstance(leaf, Adapter) or not hasattr(leaf, "shape"):
            return leaf
        if not (module_name(mapping, name, ()) or module_name(mapping, name, (0,))):
            return leaf
        shape_only = np.broadcast_to(np.float32(0), leaf.shape)  # names and shapes, no copy of the base
        wanted = list(_full_tensors(mapping, name, shape_only))
        if not all(torch_name in full for _, torch_name, _ in wanted):
            return leaf
        layers = []
        for _, torch_name, like in wanted:
            value = full[torch_name]
            if value.shape != like.shape:
                raise ValueError(f"lorax.peft: {torch_name!r} {value.shape} does not fit {name!r}; "
                                 f"expected {like.shape}.")
            claimed.add(torch_name)
            layers.append(value.T if name.endswith("/kernel") else value)
        value = layers[0] if module_name(mapping, name, ()) else np.stack(layers)
        return Trainable(jnp.asarray(value, leaf.dtype))

    out = _map(fill, lp)
    if unlike:
        raise ValueError(f"lorax.peft: the base is not the one {directory} was saved from:\n" + "\n".join(unlike)
                         + "\nA base already merged with this adapter, another checkpoint or another seed? Load "
                         "onto the original base, or pass check_base=False to load anyway.")
    if full:
        out = _map(fill_full, out)
    unclaimed = sorted((set(modules) | set(full)) - claimed)
    if unclaimed:
        raise ValueError(f"lorax.peft: adapter modules with no matching weight in the base: {unclaimed}; "
                         "the adapter is for another base, or the mapping misses them.")
    return out


