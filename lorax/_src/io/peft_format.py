"""How an adapter kind other than LoRA/DoRA travels as a Hugging Face PEFT adapter folder: the
kind declares it (its ``peft`` class attribute), `lorax.peft.save_peft` and ``load_peft`` read it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]


def no_options(config: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    """A kind whose PEFT config carries no `LoraConfig` ``options``."""
    return {}


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """A kind's PEFT adapter folder: its ``peft_type``, the tensors of one layer by PEFT's names,
    and its config. `lorax.peft.save_peft` writes and ``load_peft`` reads every kind that sets
    its class attribute ``peft`` to one; the folder's generic parts (module names, the config's
    targets, ``r``/``alpha`` and their patterns for a ranked kind, base fingerprints, the atomic
    write) are lorax's.

    Attributes:
      peft_type: PEFT's name of the method (``"LOHA"``).
      config_keys: every key of PEFT's config class for it; `load_peft` refuses others.
      tensor_names: the tensor names of one module (``"hada_w1_a"``, ...): a file's key is
        ``base_model.model.<module>.<name>``.
      to_peft: ``(node, layer) -> tensors``: one layer's trained arrays (``{field: array}``, the
        stack axes taken off) as PEFT's tensors.
      from_peft: ``(node, tensors) -> layer``: the inverse; `load_peft` checks the shapes.
      config: ``(nodes) -> entries``: the kind's own config entries from ``[(module, node)]``.
      options: ``(config, modules) -> options``: the `LoraConfig` ``options`` a folder's config
        asks for; ``modules`` maps each adapted lorax path to its module name.
      ranked: whether ``r`` applies.
      scaled: whether ``alpha``, ``rank_pattern`` and ``alpha_pattern`` apply too (scale
        ``alpha / r``; VeRA has one rank and no scale).
      shared: the kind's `shared_field` arrays by field, each written once under its file key
        (VeRA's ``{"vera_a": "base_model.vera_A", ...}``), as the nodes hold it.

    >>> import lorax
    >>> lorax.LohaWeight.peft.peft_type, lorax.LohaWeight.peft.tensor_names[:2]
    ('LOHA', ('hada_w1_a', 'hada_w1_b'))
    """

    peft_type: str
    config_keys: frozenset[str]
    tensor_names: tuple[str, ...]
    to_peft: Callable[[Any, Tensors], Tensors]
    from_peft: Callable[[Any, Tensors], Tensors]
    config: Callable[[list[tuple[str, Any]]], dict[str, Any]]
    options: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]] = no_options
    ranked: bool = True
    scaled: bool = True
    shared: dict[str, str] = dataclasses.field(default_factory=dict)
