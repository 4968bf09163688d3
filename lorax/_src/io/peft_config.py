"""PEFT's ``adapter_config.json``, read and checked against peft 0.21's own rules."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from lorax._src.validate import index, real

CONFIG_FILE = "adapter_config.json"

# Keys of peft 0.21's LoraConfig. Keys outside this set are refused; these must hold
# their inert default (None, False, "none", {} or []) since lorax does not implement them:
_UNSUPPORTED = ("lora_bias", "layer_replication", "target_parameters",
                "trainable_token_indices", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                "layers_to_transform", "megatron_config", "arrow_config")
_KNOWN = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
          "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
          "init_lora_weights", "kasa_config", "layers_pattern", "loftq_config", "lora_alpha",
          "lora_dropout", "lora_ga_config", "megatron_core", "monteclora_config", "peft_type",
          "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
          "target_modules", "task_type", "use_rslora", "velora_config", "modules_to_save", "use_dora",
          *_UNSUPPORTED}


def read_json(directory: Path) -> dict:
    """The config of the adapter folder ``directory`` as a JSON object, not yet checked."""
    file = directory / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"lorax.peft: cannot read {file}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"lorax.peft: {file}: expected a JSON object, got {type(config).__name__} {config!r:.80}.")
    return config


def read_config(directory: Path) -> dict:
    """The LoRA config of the adapter folder ``directory``, checked; ``lora_alpha`` filled with PEFT's default 8."""
    config = read_json(directory)
    where = f"lorax.peft: {directory / CONFIG_FILE}:"
    unknown = sorted(set(config) - _KNOWN)
    if unknown:
        raise ValueError(f"lorax.peft: unknown adapter_config.json keys {unknown}; "
                         "lorax reads peft 0.21's LoRA configs.")
    if "r" not in config:
        raise ValueError("lorax.peft: adapter_config.json has no 'r' (the rank).")
    for key in _UNSUPPORTED:
        if config.get(key) not in (None, False, {}, []):
            raise ValueError(f"lorax.peft: {key}={config[key]!r} is not supported by lorax.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"lorax.peft: bias={config['bias']!r} is not supported; only 'none'.")
    check_rank(config, where, "lora_alpha")
    if not isinstance(config.get("use_rslora", False), bool):
        raise TypeError(f"{where} use_rslora must be true or false, got {config['use_rslora']!r}.")
    check_modules(config, where)
    return config


def check_rank(config: dict, where: str, alpha_key: str) -> None:
    """``r``, the alpha (PEFT's default 8) and their per-module patterns, checked in place."""
    config["r"] = index(config["r"], f"{where} r", minimum=1)
    config[alpha_key] = real(config.get(alpha_key, 8), f"{where} {alpha_key}", positive=True)
    for key, check in (("rank_pattern", lambda v, w: index(v, w, minimum=1)),
                       ("alpha_pattern", lambda v, w: real(v, w, positive=True))):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{where} {key} must be an object {{module regex: value}}, got {patterns!r}.")
        config[key] = {k: check(v, f"{where} {key}[{k!r}]") for k, v in patterns.items()}
        _compile(list(patterns), f"{where} {key}")


def check_modules(config: dict, where: str) -> None:
    """``target_modules``, ``exclude_modules`` and ``modules_to_save``: names or a regex."""
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(key)
        if value is None and key != "target_modules":
            continue
        if not (isinstance(value, str) and key != "modules_to_save") and \
                not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where} {key} must be a list of module names"
                             f"{' or a regex string' if key != 'modules_to_save' else ''}, got {value!r}.")
        _compile([value] if isinstance(value, str) else value, f"{where} {key}")


def _compile(patterns: list, where: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"{where}: {pattern!r} is not a valid regex ({err}).") from None


def pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: a key matches a module name ending in ``.key``.

    >>> pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8)
    2
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA layer on ``module`` (peft 0.21's ``check_target_module_exists``).

    >>> targeted({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj")
    True
    >>> targeted({"target_modules": r".*\\.v_proj"}, "model.layers.0.self_attn.q_proj")
    False
    """
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and _listed(exclude, module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config["target_modules"]
    if targets == "all-linear":  # PEFT expands it when it creates the adapter; read as "every module"
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return _listed(targets, module)


def skip_untargeted(config: dict, modules: dict[str, Any], file: Path, stacklevel: int) -> None:
    """Drop from ``modules`` (tensors by module name) those ``target_modules`` does not cover,
    with a warning (``stacklevel``: that of the user's call, counted from here), as PEFT skips them."""
    untargeted = sorted(m for m in modules if not targeted(config, m))
    if untargeted:
        warnings.warn(f"lorax.peft: {file}: target_modules={config['target_modules']!r} does not cover "
                      f"{untargeted}; their tensors are skipped, as PEFT skips them.", stacklevel=stacklevel)
        for module in untargeted:
            del modules[module]


def _listed(names: list[str], module: str) -> bool:
    return module in names or any(module.endswith(f".{name}") for name in names)
