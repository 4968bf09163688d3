"""A GPT (multi-axis attention kernels, ``nn.scan`` over ``nn.remat`` blocks, tied head) and
its workload: train steps and forwards of full fine-tuning vs LoRA and DoRA.

The tests and the benchmarks both build their programs here, so the costs (matmul flops
counted from the jaxpr, XLA's compiled bytes; deterministic, from shapes alone) and the wall times (on real arrays)
measure the same programs. Every train step has the signature ``step(trained, opt_state,
*rest) -> (trained, opt_state, loss)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lorax

from .flops import matmul_flops


class Block(nn.Module):
    d: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _):
        hd = self.d // self.heads
        dense = lambda name: nn.DenseGeneral((self.heads, hd), name=name, dtype=self.dtype)  # noqa: E731
        h = nn.LayerNorm(dtype=self.dtype)(x)
        q, k, v = dense("query")(h), dense("key")(h), dense("value")(h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        n = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="out", dtype=self.dtype)(o)
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.Dense(4 * self.d, name="fc", dtype=self.dtype)(h)
        return x + nn.Dense(self.d, name="proj", dtype=self.dtype)(nn.gelu(h)), None


class GPT(nn.Module):
    """GPT-style: multi-axis attention kernels, nn.scan over nn.remat blocks, tied head."""

    vocab: int = 64
    d: int = 32
    layers: int = 2
    heads: int = 4
    max_len: int = 16
    dtype: jnp.dtype = jnp.float32
    remat: bool = True

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.d, name="wte", dtype=self.dtype)
        pos = self.param("wpe", nn.initializers.normal(0.02), (self.max_len, self.d))
        x = embed(ids) + pos[: ids.shape[1]].astype(self.dtype)
        blocks = nn.scan(nn.remat(Block) if self.remat else Block, variable_axes={"params": 0},
                         split_rngs={"params": True},
                         length=self.layers)
        x, _ = blocks(self.d, self.heads, self.dtype, name="h")(x, None)
        return embed.attend(nn.LayerNorm(dtype=self.dtype)(x))


ALL_LINEAR = "all-linear"
QV = r".*/(query|value)/kernel"
KERNELS = r".*/kernel"  # the linear layers' weights: what QLoRA stores in NF4 (embeddings stay fp32)
GPT2_SMALL = dict(d=768, heads=12, layers=4, vocab=2048, batch=4, seq=128)


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float  # matmul flops, every layer of the scan counted (XLA's cost analysis bills one)
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
    return Cost(float(matmul_flops(fn, *args)), mem.argument_size_in_bytes,
                mem.output_size_in_bytes, mem.temp_size_in_bytes, mem.alias_size_in_bytes,
                tuple(x.shape for x in jax.tree.leaves(outs)))


def xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def model(*, d, heads, layers, vocab, batch, seq, concrete: bool):
    """``(fn, params, ids)``: real arrays when ``concrete``, else shapes only."""
    net = GPT(vocab=vocab, d=d, layers=layers, heads=heads, max_len=seq, remat=False)
    fn = lambda p, ids: net.apply(p, ids)  # noqa: E731
    if concrete:
        ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab)
        return fn, net.init(jax.random.key(0), ids), ids
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return fn, jax.eval_shape(net.init, jax.random.key(0), ids), ids


KIND_OPTIONS = {"oft": {"block_size": 32}}  # PEFT's default oft_block_size


def _adapt(fn, params, ids, rank, targets, concrete, kind="lora", seed=0):
    config = lorax.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, kind=kind,
                              options=KIND_OPTIONS.get(kind, {}))
    make = lambda p: lorax.init(jax.random.key(seed), config, fn, p, ids)  # noqa: E731
    return make(params) if concrete else jax.eval_shape(make, params)


def train_steps(*, rank=8, targets=ALL_LINEAR, variants=("full", "lora", "materialized"), concrete=False,
                kind="lora", **widths) -> dict[str, tuple[Callable, tuple]]:
    """``{variant: (step, args)}`` for one Adam step; ``widths`` default to `GPT2_SMALL`;
    ``kind`` is the adapter kind (a `LoraConfig` ``kind``: "lora", "dora", "ia3", ...) of the adapted variants."""
    fn, params, ids = model(**{**GPT2_SMALL, **widths}, concrete=concrete)
    tx = optax.adam(1e-3)
    init = tx.init if concrete else (lambda p: jax.eval_shape(tx.init, p))

    def adam(loss, trained, opt):
        value, g = jax.value_and_grad(loss)(trained)
        updates, opt = tx.update(g, opt, trained)
        return optax.apply_updates(trained, updates), opt, value

    out = {}
    if "full" in variants:
        out["full"] = (lambda p, opt, ids: adam(lambda p: xent(fn(p, ids), ids), p, opt),
                       (params, init(params), ids))
    if "frozen" in variants:  # trains the positional table only: every layer's input gradient, no weight's
        wpe, rest = params["params"]["wpe"], params

        def frozen(wpe, opt, rest, ids):
            return adam(lambda w: xent(fn({"params": {**rest["params"], "wpe": w}}, ids), ids), wpe, opt)

        out["frozen"] = (frozen, (wpe, init(wpe), rest, ids))
    nf4 = lambda p: lorax.quantize(p, "nf4", targets=KERNELS)  # noqa: E731  (QLoRA: the kernels in NF4)
    bases = {"lora": lambda: params, "materialized": lambda: params,
             "qlora": lambda: nf4(params) if concrete else jax.eval_shape(nf4, params)}
    forwards = {"lora": lorax.lora(fn), "qlora": lorax.lora(fn), "materialized": lambda p, ids: fn(lorax.merge(p), ids)}
    adapted = {}
    for name in ("lora", "materialized", "qlora"):
        if name in variants:
            over = "qlora" if name == "qlora" else "plain"  # LoRA and its materialized form share adapters
            if over not in adapted:
                adapted[over] = lorax.split(_adapt(fn, bases[name](), ids, rank, targets, concrete, kind))
            trainable, frozen_part = adapted[over]
            forward = forwards[name]
            step = lambda t, opt, f, ids, forward=forward: adam(  # noqa: E731
                lambda t: xent(forward(lorax.combine(t, f), ids), ids), t, opt)
            out[name] = (step, (trainable, init(trainable), frozen_part, ids))
    return out


def train_step_costs(*, variants=("full", "lora", "materialized"), **kw) -> dict[str, Cost]:
    """Compiled costs of one Adam step (GPT-2-small widths unless given)."""
    return {name: cost(step, *args) for name, (step, args) in train_steps(variants=variants, **kw).items()}


def forwards(*, rank=8, concrete=False, **widths) -> dict[str, tuple[Callable, tuple]]:
    """``{variant: (forward, args)}``: the base, merged LoRA and unmerged (factored) LoRA."""
    fn, params, ids = model(**{**GPT2_SMALL, **widths}, concrete=concrete)
    lp = _adapt(fn, params, ids, rank, ALL_LINEAR, concrete)
    merged = lorax.merge(lp) if concrete else jax.eval_shape(lorax.merge, lp)
    return {"base": (fn, (params, ids)), "merged": (fn, (merged, ids)), "unmerged": (lorax.lora(fn), (lp, ids))}


def inference_costs(**kw) -> dict[str, Cost]:
    """Forward costs: base, merged LoRA, unmerged (factored) LoRA."""
    return {name: cost(fn, *args) for name, (fn, args) in forwards(**kw).items()}


def serving(*, count=8, rank=8, **widths) -> tuple[Callable, dict[str, tuple[Callable, tuple]]]:
    """Serving ``count`` all-linear adapters of one base from a `lorax.LoraBank` (real arrays).

    Returns ``(forward, programs)``: ``forward(bank, index, ids)`` runs the routed bank, and
    ``programs`` maps ``"base"``, ``"one adapter"`` (a scalar index), ``"mixed"`` (example
    ``i`` uses adapter ``i % count``) and ``"alone"`` (one example, adapter 0: the program
    that sequential calls, one per adapter, run) to ``(forward, args)``."""
    fn, params, ids = model(**{**GPT2_SMALL, **widths}, concrete=True)
    bank = lorax.adapters.bank({f"task{i}": _adapt(fn, params, ids, rank, ALL_LINEAR, True, seed=i)
                                for i in range(count)})

    def forward(bank, index, ids):
        return lorax.lora(fn)(lorax.adapters.route(bank, index), ids)

    mixed = jnp.arange(ids.shape[0], dtype=jnp.int32) % count
    return forward, {"base": (fn, (params, ids)), "one adapter": (forward, (bank, jnp.int32(0), ids)),
                     "mixed": (forward, (bank, mixed, ids)), "alone": (forward, (bank, jnp.int32(0), ids[:1]))}
