"""The benchmark workload: train steps and forwards of full fine-tuning vs LoRA, on a GPT.

One place builds every variant, so the compiled costs (XLA flops and bytes, deterministic,
from shapes alone) and the wall times (`walltime.py`, on real arrays) measure the same
programs. Every train step has the signature ``step(trained, opt_state, *rest) ->
(trained, opt_state, loss)``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax

import lorax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import GPT  # noqa: E402

ALL_LINEAR = "all-linear"
QV = r".*/(query|value)/kernel"
GPT2_SMALL = dict(d=768, heads=12, layers=4, vocab=2048, batch=4, seq=128)


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


def cost(fn: Callable, *args) -> Cost:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    outs = jax.eval_shape(fn, *args)
    return Cost(float(compiled.cost_analysis()["flops"]), mem.argument_size_in_bytes,
                mem.output_size_in_bytes, mem.temp_size_in_bytes, mem.alias_size_in_bytes,
                tuple(x.shape for x in jax.tree.leaves(outs)))


def _xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _model(*, d, heads, layers, vocab, batch, seq, concrete: bool):
    """``(fn, params, ids)``: real arrays when ``concrete``, else shapes only."""
    model = GPT(vocab=vocab, d=d, layers=layers, heads=heads, max_len=seq, remat=False)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    if concrete:
        ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab)
        return fn, model.init(jax.random.key(0), ids), ids
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return fn, jax.eval_shape(model.init, jax.random.key(0), ids), ids


def _adapt(fn, params, ids, rank, targets, concrete):
    config = lorax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    make = lambda p: lorax.init(jax.random.key(0), config, fn, p, ids)  # noqa: E731
    return make(params) if concrete else jax.eval_shape(make, params)


def train_steps(*, rank=8, targets=ALL_LINEAR, variants=("full", "lora", "materialized"), concrete=False,
                **widths) -> dict[str, tuple[Callable, tuple]]:
    """``{variant: (step, args)}`` for one Adam step; ``widths`` default to `GPT2_SMALL`."""
    fn, params, ids = _model(**{**GPT2_SMALL, **widths}, concrete=concrete)
    tx = optax.adam(1e-3)
    init = tx.init if concrete else (lambda p: jax.eval_shape(tx.init, p))

    def adam(loss, trained, opt):
        value, g = jax.value_and_grad(loss)(trained)
        updates, opt = tx.update(g, opt, trained)
        return optax.apply_updates(trained, updates), opt, value

    out = {}
    if "full" in variants:
        out["full"] = (lambda p, opt, ids: adam(lambda p: _xent(fn(p, ids), ids), p, opt),
                       (params, init(params), ids))
    if "frozen" in variants:  # trains the positional table only: every layer's input gradient, no weight's
        wpe, rest = params["params"]["wpe"], params

        def frozen(wpe, opt, rest, ids):
            return adam(lambda w: _xent(fn({"params": {**rest["params"], "wpe": w}}, ids), ids), wpe, opt)

        out["frozen"] = (frozen, (wpe, init(wpe), rest, ids))
    if {"lora", "materialized"} & set(variants):
        trainable, frozen_part = lorax.split(_adapt(fn, params, ids, rank, targets, concrete))
        forwards = {"lora": lorax.lora(fn), "materialized": lambda p, ids: fn(lorax.merge(p), ids)}
        for name in ("lora", "materialized"):
            if name in variants:
                forward = forwards[name]
                step = lambda t, opt, f, ids, forward=forward: adam(  # noqa: E731
                    lambda t: _xent(forward(lorax.combine(t, f), ids), ids), t, opt)
                out[name] = (step, (trainable, init(trainable), frozen_part, ids))
    return out


def train_step_costs(*, variants=("full", "lora", "materialized"), **kw) -> dict[str, Cost]:
    """Compiled costs of one Adam step (GPT-2-small widths unless given)."""
    return {name: cost(step, *args) for name, (step, args) in train_steps(variants=variants, **kw).items()}


def forwards(*, rank=8, concrete=False, **widths) -> dict[str, tuple[Callable, tuple]]:
    """``{variant: (forward, args)}``: the base, merged LoRA and unmerged (factored) LoRA."""
    fn, params, ids = _model(**{**GPT2_SMALL, **widths}, concrete=concrete)
    lp = _adapt(fn, params, ids, rank, ALL_LINEAR, concrete)
    merged = lorax.merge(lp) if concrete else jax.eval_shape(lorax.merge, lp)
    return {"base": (fn, (params, ids)), "merged": (fn, (merged, ids)), "unmerged": (lorax.lora(fn), (lp, ids))}


def inference_costs(**kw) -> dict[str, Cost]:
    """Forward costs: base, merged LoRA, unmerged (factored) LoRA."""
    return {name: cost(fn, *args) for name, (fn, args) in forwards(**kw).items()}
