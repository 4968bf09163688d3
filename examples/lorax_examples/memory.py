"""Where a LLaMA train step's memory goes, from XLA's compiled program (deterministic).

Three steps on the same model, batch and AdamW, each compiled with its train state donated
(as a training loop runs it): full fine-tuning, LoRA written into the model by hand
(`LlamaConfig.lora_targets`: x·W + s·(x·a)·b, the reference any library should meet) and
lorax's LoRA on the same weights. `footprint` reads XLA's ``memory_analysis()``; `breakdown`
finds the stacks among the buffers of XLA's memory-usage report. Deterministic for a given jax
version and XLA flags.

Without donation, full fine-tuning's new weights and optimizer state are fresh output buffers,
and XLA places the activations saved for the backward inside them until they are written: its
"temporaries" then look small. Donated, every step holds its activations in temporaries, and
arguments + temporaries is what the step needs.
"""

from __future__ import annotations

import dataclasses
import glob
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.compilation_cache import compilation_cache

import lorax

from .llama import Llama, LlamaConfig, bf16_as_bits

VARIANTS = ("full", "hand", "lorax")
MiB = 2**20


def train_step(variant: str, config: LlamaConfig, params: dict, ids: jax.Array, targets=("q_proj", "v_proj"),
               rank: int = 8):
    """``(jitted step, its arguments)``: one AdamW step of ``variant`` with the state donated."""
    tx = optax.adamw(1e-4, weight_decay=0.0)
    plain = lambda p, x, t: Llama(config).apply(p, x, targets=t)  # noqa: E731
    forward: Callable[..., Any]
    if variant == "hand" and not set(targets) <= {"q_proj", "k_proj", "v_proj", "o_proj"}:
        raise ValueError(f"the hand-written LoRA adapts attention projections only, got targets={targets!r}")
    if variant == "full":
        state, rest, forward = params, (), plain
    elif variant == "hand":
        hand = dataclasses.replace(config, lora_targets=tuple(targets), lora_rank=rank, lora_alpha=2.0 * rank)
        state = _hand_factors(params, targets, rank)
        rest, forward = (params,), lambda s, p, x, t: Llama(hand).apply(_with_factors(p, s), x, targets=t)
    elif variant == "lorax":
        pattern = r".*/(" + "|".join(targets) + r")/kernel"
        adapted = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=pattern),
                             plain, params, ids[:, :-1], ids[:, 1:])
        state, frozen = lorax.split(adapted)
        frozen = bf16_as_bits(frozen, config.head_chunks)
        rest, forward = (frozen,), lambda s, f, x, t: lorax.lora(plain)(lorax.combine(s, f), x, t)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")

    def step(state, opt, *rest_and_ids):
        *rest, ids = rest_and_ids
        xent = lambda s: forward(s, *rest, ids[:, :-1], ids[:, 1:])  # noqa: E731
        loss, grads = jax.value_and_grad(xent)(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    return jax.jit(step, donate_argnums=(0, 1)), (state, tx.init(state), *rest, ids)


def _hand_factors(params: dict, targets, rank: int) -> dict:
    attention = params["params"]["layers"]["self_attn"]
    factors = {}
    for i, name in enumerate(targets):
        layers, fan_in, fan_out = attention[name]["kernel"].shape
        a = jax.random.normal(jax.random.key(i), (layers, fan_in, rank)) / rank
        factors[name] = {"lora_a": a, "lora_b": jnp.zeros((layers, rank, fan_out))}
    return factors


def _with_factors(params: dict, factors: dict) -> dict:
    inner = params["params"]
    attention = {**inner["layers"]["self_attn"]}
    for name, ab in factors.items():
        attention[name] = {**attention[name], **ab}
    return {"params": {**inner, "layers": {**inner["layers"], "self_attn": attention}}}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A compiled step's memory in bytes (XLA's ``memory_analysis()``) and its temporaries by
    class: the two kinds of stacks `breakdown` finds, and ``"other"``, the rest."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    classes: dict

    @property
    def total(self) -> int:
        """Arguments + outputs that are not donated arguments + temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def footprint(step, args, loops: tuple[int, ...] = ()) -> Footprint:
    """Compile ``step`` on ``args`` (past JAX's compilation cache, so that XLA writes its
    report) and read its memory, the temporaries by class; ``loops``: the lengths of layer loops
    other than the stacks' own (`LlamaConfig.remat_groups`: the groups and a group's layers)."""
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX reads the setting once per process, at its first compile
    try:
        with tempfile.TemporaryDirectory() as dump:
            compiled = step.lower(*args).compile(compiler_options={"xla_dump_to": dump})
            reports = glob.glob(str(Path(dump) / "*memory-usage-report.txt"))
            if not reports:
                raise RuntimeError("XLA wrote no memory-usage report for the step")
            classes = breakdown(Path(reports[0]).read_text(), _weight_shapes(args), loops)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
        compilation_cache.reset_cache()
    m = compiled.memory_analysis()
    classes["other"] = max(0, m.temp_size_in_bytes - sum(classes.values()))
    return Footprint(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                     m.temp_size_in_bytes, classes)


def _weight_shapes(args) -> set[tuple[int, ...]]:
    """The shapes of the stacked weights among ``args`` (3-D leaves, quantized ones included)."""
    leaves = jax.tree.leaves(args, is_leaf=lambda x: isinstance(x, lorax.QuantizedArray))
    return {tuple(x.shape) for x in leaves if len(getattr(x, "shape", ())) == 3}


_BUFFER = re.compile(r"^\s*\S+\(\s*\d+%\);\s*([\d.]+)(KiB|MiB|GiB|B);\s*\d+;\s*\d+;\s*(.*)$")
_SHAPE = re.compile(r"(?:(\d+)×)?(\w+)\[([\d,]*)\]")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def breakdown(report: str, weight_shapes: set[tuple[int, ...]], loops: tuple[int, ...] = ()) -> dict[str, int]:
    """Bytes of the stacks among the buffers of XLA's memory-usage report, by the largest value
    sharing each buffer: ``"weight-shaped stacks"`` (shaped like a stacked weight of
    ``weight_shapes``: gradients of a stack, or a converted copy of one) and ``"activation
    stacks"`` (another array of three or more axes led by the layer count or one of ``loops``:
    what a layer loop saves for the backward; a batch as large would be counted too). Only the
    report's first section (the shared space) is read."""
    section = report.split("\n\n")[0]
    layers = {shape[0] for shape in weight_shapes} | set(loops)
    classes = {"weight-shaped stacks": 0, "activation stacks": 0}
    for line in section.splitlines():
        match = _BUFFER.match(line)
        if not match:
            continue
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
        shapes = [tuple(int(d) for d in dims.split(",") if d) for _, _, dims in _SHAPE.findall(match.group(3))]
        largest = max(shapes, key=lambda s: int(np.prod(s)) if s else 0, default=())
        if largest in weight_shapes:
            classes["weight-shaped stacks"] += size
        elif len(largest) >= 3 and largest[0] in layers:
            classes["activation stacks"] += size
    return classes
