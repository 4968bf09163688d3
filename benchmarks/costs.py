"""Compiled train-step costs (XLA flops and bytes) of full fine-tuning vs LoRA.

Deterministic measures for tests and for `benchmarks/run.py`: nothing here runs a step,
everything is lowered and compiled from shapes alone.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lorax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import GPT  # noqa: E402

ALL_LINEAR = "all-linear"
QV = r".*/(query|value)/kernel"


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    output_shapes: tuple

    @property
    def step_bytes(self) -> int:
        """Memory the step needs: its inputs, outputs and temporaries, less donated aliases."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def _cost(fn, *args) -> Cost:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    outs = jax.eval_shape(fn, *args)
    return Cost(float(compiled.cost_analysis()["flops"]), mem.argument_size_in_bytes,
                mem.output_size_in_bytes, mem.temp_size_in_bytes, mem.alias_size_in_bytes,
                tuple(x.shape for x in jax.tree.leaves(outs)))


def _xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def train_step_costs(*, d=768, heads=12, layers=2, vocab=8192, batch=4, seq=128, rank=8,
                     targets=ALL_LINEAR, variants=("full", "lora", "materialized")) -> dict[str, Cost]:
    """Costs of one Adam step at the given widths (GPT-2-small: d=768, 12 heads)."""
    model = GPT(vocab=vocab, d=d, layers=layers, heads=heads, max_len=seq, remat=False)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    config = lorax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    lp = jax.eval_shape(lambda p: lorax.init(jax.random.key(0), config, fn, p, ids), params)
    trainable, frozen = lorax.split(lp)
    tx = optax.adam(1e-3)
    out = {}
    if "full" in variants:
        def full(p, opt, ids):
            loss, g = jax.value_and_grad(lambda p: _xent(fn(p, ids), ids))(p)
            updates, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, updates), opt, loss

        out["full"] = _cost(full, params, jax.eval_shape(tx.init, params), ids)

    def lora_step(forward):
        def step(t, f, opt, ids):
            loss, g = jax.value_and_grad(lambda t: _xent(forward(lorax.combine(t, f), ids), ids))(t)
            updates, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, updates), opt, loss

        return step

    opt = jax.eval_shape(tx.init, trainable)
    if "lora" in variants:
        out["lora"] = _cost(lora_step(lorax.lora(fn)), trainable, frozen, opt, ids)
    if "materialized" in variants:
        out["materialized"] = _cost(lora_step(lambda p, ids: fn(lorax.merge(p), ids)),
                                    trainable, frozen, opt, ids)
    return out


def inference_costs(*, d=768, heads=12, layers=2, vocab=8192, batch=4, seq=128, rank=8) -> dict[str, Cost]:
    """Forward costs: base, merged LoRA, unmerged (factored) LoRA."""
    model = GPT(vocab=vocab, d=d, layers=layers, heads=heads, max_len=seq, remat=False)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    config = lorax.LoraConfig(rank=rank)
    lp = jax.eval_shape(lambda p: lorax.init(jax.random.key(0), config, fn, p, ids), params)
    return {"base": _cost(fn, params, ids),
            "merged": _cost(fn, jax.eval_shape(lorax.merge, lp), ids),
            "unmerged": _cost(lorax.lora(fn), lp, ids)}
