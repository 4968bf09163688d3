"""PEFT adapter folders of the kinds that declare a `PeftFormat` (IA³, LoHa, LoKr): the kind
gives its tensors, their names and its config entries; here is what all of them share."""

from __future__ import annotations

import collections
import json
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
from lorax._src.io.peft_config import CONFIG_FILE, check_modules, check_rank, pattern_value, skip_untargeted
from lorax._src.io.peft_folder import (
    BASE_KEY,
    PREFIX,
    WEIGHTS_FILE,
    Mapping,
    _recorded_bases,
    _require_base,
    _unlike_base,
    _write_folder,
    blank_nodes,
    claim,
    module_name,
)
from lorax._src.io.records import fingerprint
from lorax._src.kinds.adapter import KINDS, Adapter
from lorax._src.paths import named_leaves, unique_named_leaves
from lorax._src.sharding import place_factors
from lorax._src.trainable import Trainable
from lorax._src.trees import _map
from lorax._src.validate import real


def kind_of(peft_type: Any) -> type[Adapter] | None:
    """The registered kind whose `PeftFormat` has ``peft_type``, or None."""
    return next((k for k in KINDS.values() if k.peft is not None and k.peft.peft_type == peft_type), None)


def _stack(leaf: Adapter) -> tuple[int, ...]:
    return tuple(leaf.shape[i] for i in leaf.stack_axes)


def save(target: Path, params: Any, mapping: Mapping, kind: type[Adapter], *, base_model_name_or_path: str,
         task_type: str | None) -> Path:
    """`lorax.peft.save_peft` for the adapters of ``params``, all of ``kind``."""
    fmt = kind.peft
    tensors: dict[str, np.ndarray] = {}
    nodes: list[tuple[str, Adapter]] = []
    bases, ranks, alphas, owner = {}, {}, {}, {}
    for path, leaf in unique_named_leaves(params, "lorax.peft.save_peft"):
        if isinstance(leaf, Trainable):
            raise ValueError(f"lorax.peft: {path!r} is trained fully (modules_to_save); lorax writes those with "
                             f"LoRA folders only, not with {fmt.peft_type} ones.")
        if not isinstance(leaf, Adapter):
            continue
        _require_base(path, leaf)
        leaf.check(path)
        matrices = leaf.to_matrices(dense(leaf.w))
        quantized = format_of(leaf.w)
        arrays = {n: np.asarray(jax.device_get(x)) for n, x in leaf.trained().items()}
        for index in np.ndindex(*_stack(leaf)):
            module = module_name(mapping, path, index)
            if module is None:
                raise ValueError(f"lorax.peft: the mapping gives no torch module for {path!r}"
                                 f"{f' layer {index}' if index else ''}.")
            claim(owner, module, path, index)
            layer = {n: x[index] for n, x in arrays.items()}
            for name, value in fmt.to_peft(leaf, layer).items():
                tensors[f"{PREFIX}{module}.{name}"] = np.ascontiguousarray(value)
            nodes.append((module, leaf))
            bases[module] = fingerprint(matrices[index], quantized)
            if fmt.ranked:
                ranks[module] = leaf.rank
            if fmt.scaled and fmt.ranked:
                alphas[module] = real(leaf.scale * leaf.rank, f"lorax.peft: alpha (scale x rank) of {path!r}",
                                      positive=True)
        for name, key in fmt.shared.items():
            shared = np.asarray(jax.device_get(getattr(leaf, name)))
            if key in tensors and not np.array_equal(tensors[key], shared):
                raise ValueError(f"lorax.peft: {path!r} holds another {name} than the weights before it; a "
                                 f"{fmt.peft_type} folder holds one {key!r} for all its modules.")
            tensors[key] = shared
    if not nodes:
        raise ValueError(f"lorax.peft: params hold no {kind.__name__} to export.")
    generic = {"exclude_modules": None, "modules_to_save": None}  # where PEFT's config for the kind has them
    config: dict[str, Any] = {
        "peft_type": fmt.peft_type, "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _ in nodes}),
        **{k: v for k, v in generic.items() if k in fmt.config_keys}, "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, **fmt.config(nodes)}
    if fmt.ranked and not fmt.scaled:
        if len(set(ranks.values())) > 1:
            raise ValueError(f"lorax.peft: a {fmt.peft_type} folder holds one rank r; got {ranks}.")
        config["r"] = next(iter(ranks.values()))
    elif fmt.ranked:
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(a for m, a in alphas.items() if ranks[m] == r).most_common(1)[0][0]
        config |= {"r": r, "alpha": alpha, "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
                   "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != alpha}}
    _write_folder(target, json.dumps(config, indent=2, sort_keys=True),
                  {k: v.astype(np.float32) if v.dtype.kind == "V" else v for k, v in tensors.items()},
                  {BASE_KEY: json.dumps(bases, sort_keys=True)})
    return target


def check_config(config: dict, kind: type[Adapter], where: str) -> None:
    """The config of a ``kind`` folder against PEFT's keys for it, and what lorax does not read."""
    fmt = kind.peft
    unknown = sorted(set(config) - fmt.config_keys)
    if unknown:
        raise ValueError(f"{where} unknown keys {unknown} for peft_type {fmt.peft_type!r} (peft 0.21's).")
    for key in ("layers_to_transform", "layers_pattern", "modules_to_save"):
        if config.get(key) not in (None, [], ""):
            raise ValueError(f"{where} {key}={config[key]!r} is not supported by lorax for {fmt.peft_type} "
                             "adapters.")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{where} fan_in_fan_out=true is not supported (torch Linear layers only).")
    if fmt.ranked:
        config.setdefault("r", 8)
        check_rank(config, where, "alpha")
    if fmt.ranked and not fmt.scaled and (config["rank_pattern"] or config["alpha_pattern"]):
        raise ValueError(f"{where} rank_pattern and alpha_pattern do not apply to {fmt.peft_type} (one rank, "
                         "no alpha).")
    check_modules(config, where)


def load(directory: Path, config: dict, kind: type[Adapter], fn: Callable, params: Any, args: tuple,
         kwargs: dict, mapping: Mapping, check_base: bool) -> Any:
    """`lorax.peft.load_peft` for a folder of ``kind`` (its config already read)."""
    fmt = kind.peft
    check_config(config, kind, f"lorax.peft: {directory / CONFIG_FILE}:")
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"lorax.peft: {directory / WEIGHTS_FILE} is missing or corrupt: {err}") from None
    recorded = _recorded_bases(directory / WEIGHTS_FILE) if check_base else {}
    names = "|".join(re.escape(n) for n in fmt.tensor_names)
    modules: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    missing = sorted(key for key in fmt.shared.values() if key not in tensors)
    if missing:
        raise ValueError(f"lorax.peft: {directory / WEIGHTS_FILE} lacks {missing}, the projections all its "
                         f"modules share (a {fmt.peft_type} adapter saved with save_projection=false, whose "
                         "torch-seeded values lorax cannot draw again); save it with save_projection=true.")
    shared = {name: tensors.pop(key) for name, key in fmt.shared.items()}
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.({names})", key)
        if not match:
            raise ValueError(f"lorax.peft: unexpected tensor {key!r} in a {fmt.peft_type} folder: keys are "
                             f"'{PREFIX}<module>.<name>' with a name in {list(fmt.tensor_names)}.")
        modules[match.group(1)][match.group(2)] = value
    skip_untargeted(config, modules, directory / CONFIG_FILE, stacklevel=4)

    targets: dict[str, str] = {}  # lorax path -> module of its (first) layer
    for name, leaf in named_leaves(params):
        for index in ((), (0,)):
            module = module_name(mapping, name, index) if hasattr(leaf, "shape") else None
            if module in modules:
                targets[name] = module
    if not targets:
        raise ValueError(f"lorax.peft: no weight of the base maps to the adapter's modules "
                         f"{sorted(modules)[:5]}...; wrong base or mapping.")
    ranked: dict[str, Any] = dict(rank=config["r"]) if fmt.ranked else {}
    if fmt.ranked and fmt.scaled:
        ranked = dict(rank=config["r"], alpha=config["alpha"],
                      rank_pattern={re.escape(n): pattern_value(config["rank_pattern"], m, config["r"])
                                    for n, m in targets.items()},
                      alpha_pattern={re.escape(n): pattern_value(config["alpha_pattern"], m, config["alpha"])
                                     for n, m in targets.items()})
    lp = blank_nodes(LoraConfig(kind=kind.kind, targets=[re.escape(n) for n in targets],
                                options=fmt.options(config, targets), **ranked), fn, params, args, kwargs)
    claimed: set[str] = set()
    unlike: list[str] = []

    def fill(name, leaf):
        if not isinstance(leaf, kind):
            return leaf
        arrays = leaf.trained()  # blank: every layer is filled below
        matrices = leaf.to_matrices(dense(leaf.w)) if recorded else None
        quantized = format_of(leaf.w)
        want = {n: x.shape for n, x in fmt.to_peft(leaf, {n: x[(0,) * len(leaf.stack_axes)]
                                                          for n, x in arrays.items()}).items()}
        for index in np.ndindex(*_stack(leaf)):
            module = module_name(mapping, name, index)
            where = f"{name!r}{f' layer {index}' if index else ''}"
            if module not in modules:
                raise ValueError(f"lorax.peft: the adapter has no tensors for {module!r} ({where}).")
            claimed.add(module)
            if matrices is not None:
                unlike.extend(_unlike_base(recorded, module, where, matrices[index], quantized,
                                           directory / WEIGHTS_FILE))
            got = {n: x.shape for n, x in modules[module].items()}
            if got != want:
                raise ValueError(f"lorax.peft: {module!r} holds {_shapes(got)}; {where} {tuple(leaf.shape)} "
                                 f"takes {_shapes(want)} ({fmt.peft_type}).")
            if fmt.ranked and fmt.scaled:
                rank = pattern_value(config["rank_pattern"], module, config["r"])
                alpha = pattern_value(config["alpha_pattern"], module, config["alpha"])
                if (rank, alpha / rank) != (leaf.rank, leaf.scale):
                    raise ValueError(f"lorax.peft: {module!r} has rank {rank} and alpha {alpha}, unlike layer 0 of "
                                     f"{name!r} (rank {leaf.rank}, scale {leaf.scale}); one stacked weight "
                                     "holds one rank and scale.")
            for n, value in fmt.from_peft(leaf, modules[module]).items():
                arrays[n][index] = value
        return place_factors(leaf.replace(**{n: jnp.asarray(x, getattr(leaf, n).dtype) for n, x in arrays.items()},
                                          **shared_for(name, leaf)))

    placed: dict[str, jax.Array] = {}

    def shared_for(name: str, leaf: Adapter) -> dict[str, jax.Array]:
        """The folder's shared arrays, one array each for all the nodes."""
        for n, value in shared.items():
            want = getattr(leaf, n).shape
            if value.shape != want:
                raise ValueError(f"lorax.peft: {fmt.shared[n]!r} is {value.shape}; the adapted weights of this base "
                                 f"at rank {leaf.rank} take {want} (as wide as the widest of them).")
            placed.setdefault(n, jnp.asarray(value, getattr(leaf, n).dtype))
        return dict(placed)

    out = _map(fill, lp)
    if unlike:
        raise ValueError(f"lorax.peft: the base is not the one {directory} was saved from:\n" + "\n".join(unlike)
                         + "\nA base already merged with this adapter, another checkpoint or another seed? Load "
                         "onto the original base, or pass check_base=False to load anyway.")
    unclaimed = sorted(set(modules) - claimed)
    if unclaimed:
        raise ValueError(f"lorax.peft: adapter modules with no matching weight in the base: {unclaimed}; "
                         "the adapter is for another base, or the mapping misses them.")
    return out


def _shapes(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in sorted(shapes.items()))
