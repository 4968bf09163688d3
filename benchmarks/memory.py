"""Where a LLaMA train step's memory goes: full fine-tuning, LoRA written by hand into the model
and lorax's LoRA, on one base, from XLA's compiled programs (deterministic; prints a table,
writes JSON).

Run from the repository root, the examples' package on the path:
PYTHONPATH=examples python3 benchmarks/memory.py ...

    python benchmarks/memory.py                  # SmolLM2-135M, fp32 base, batch 4 × 128, LoRA q,v r=8
    python benchmarks/memory.py --base bf16      # bf16 weights (also: q4, the GGUF's blocks; lorax only)
    python benchmarks/memory.py --layers 2       # the first 2 decoder layers: a smoke run
    python benchmarks/memory.py --remat dots_with_no_batch_dims_saveable  # what the backward saves
    python benchmarks/memory.py --remat full --remat-groups 6  # the layer loop as 6 recomputed groups
    python benchmarks/memory.py --random         # SmolLM2-135M's shapes, random weights: no GGUF needed

Every step is compiled with its train state donated; see `lorax_examples.memory` for why the
undonated full fine-tuning step's temporaries mislead.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lorax_examples import memory, smollm
from lorax_examples.llama import Llama, LlamaConfig, quantize_like_gguf, with_memory_options
from report_files import written

HERE = Path(__file__).resolve().parent


def random_model(base: str, layers: int | None):
    """``(config, params)`` of SmolLM2-135M's shapes with random weights (memory depends on
    shapes alone): fp32, bf16, or q4 as the GGUF file holds it (Q4_1 layers, a Q8_0 embedding)."""
    config = LlamaConfig(layers=layers or smollm.LAYERS, matmul_dtype=None if base == "fp32" else jnp.bfloat16)
    params = Llama(dataclasses.replace(config, matmul_dtype=None)).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    if base == "bf16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    elif base == "q4":
        params = quantize_like_gguf(params)
    return config, params


def rows(base: str, layers: int | None, batch: int, seq: int, remat: str = "none", random: bool = False,
         variants: tuple[str, ...] = memory.VARIANTS, head_chunks: int = 0, remat_groups: int = 0) -> list[dict]:
    """Each step's memory on ``base``; ``remat``: none, full (each layer recomputed in the
    backward) or a ``jax.checkpoint_policies`` name (what each layer saves); ``random``: the
    model's shapes with random weights; ``head_chunks``: the loss over that many vocabulary
    slices (`lorax_examples.llama.chunked_xent`), 0 over the whole vocabulary
    (`lorax_examples.xent.fused_xent`); ``remat_groups``: the layer loop as that many recomputed
    groups (`lorax_examples.llama.grouped_layers`), 0 as one."""
    config, params = random_model(base, layers) if random else smollm.load(base=base, layers=layers)[:2]
    config = with_memory_options(config, remat, head_chunks, remat_groups)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab, (batch, seq + 1)), jnp.int32)
    if base == "q4":  # a quantized base has no dense gradient
        variants = tuple(v for v in variants if v == "lorax")
    loops = (remat_groups, config.layers // remat_groups) if remat_groups else ()  # led by neither stack axis
    out = []
    for variant in variants:
        f = memory.footprint(*memory.train_step(variant, config, params, ids), loops)
        out.append(dict(variant=variant, base=base, layers=config.layers, batch=batch, seq=seq, remat=remat,
                        head_chunks=head_chunks, remat_groups=remat_groups, weights="random" if random else "gguf",
                        platform=jax.default_backend(),
                        arguments_mib=f.arguments / memory.MiB, temporaries_mib=f.temporaries / memory.MiB,
                        total_mib=f.total / memory.MiB, **{f"{k}_mib": v / memory.MiB for k, v in f.classes.items()}))
    return out


def markdown(table: list[dict]) -> str:
    r = table[0]
    groups = f" in {r['remat_groups']} groups" if r.get("remat_groups") else ""
    lines = [f"**Train-step memory, SmolLM2-135M ({r['layers']} layers), batch {r['batch']} × {r['seq']}, "
             f"AdamW, LoRA q,v r=8, state donated, remat {r.get('remat', 'none')}"
             f"{groups}, loss over "
             f"{r.get('head_chunks') or 'no'} vocabulary slices, {r.get('weights', 'gguf')} "
             f"weights, XLA:{r.get('platform', 'cpu').upper()}** (XLA memory_analysis, MiB)", "",
             "| step | base | arguments | temporaries | of which activation stacks | weight-shaped stacks | other "
             "| total |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['base']} | {r['arguments_mib']:.0f} | {r['temporaries_mib']:.0f} | "
              f"{r.get('activation stacks_mib', 0):.0f} | {r.get('weight-shaped stacks_mib', 0):.0f} | "
              f"{r.get('other_mib', 0):.0f} | {r['total_mib']:.0f} |" for r in table]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=smollm.BASES, default="fp32")
    p.add_argument("--layers", type=int, help="keep the first N decoder layers; all 30 by default")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--remat", default="none", help="none, full, or a jax.checkpoint_policies name")
    p.add_argument("--head-chunks", type=int, default=0,
                   help="the loss over this many slices of the vocabulary (a divisor of 49152); "
                        "0: the whole vocabulary, 128 tokens at a time")
    p.add_argument("--remat-groups", type=int, default=0,
                   help="the layer loop as this many groups, each recomputed (a divisor of the layers; for "
                        "adapters: the full step sums its stacks' gradients whole in each group); 0: one loop")
    p.add_argument("--variants", default=",".join(memory.VARIANTS), help="which steps, comma-separated")
    p.add_argument("--random", action="store_true", help="SmolLM2-135M's shapes with random weights (no GGUF file)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    try:
        with_memory_options(LlamaConfig(layers=args.layers or LlamaConfig().layers), args.remat, args.head_chunks,
                            args.remat_groups)
    except ValueError as refused:
        p.error(f"--{refused}")
    variants = tuple(args.variants.split(","))
    if not set(variants) <= set(memory.VARIANTS):
        p.error(f"--variants takes some of {','.join(memory.VARIANTS)}, got {args.variants!r}")
    if args.base == "q4" and "lorax" not in variants:
        p.error("--base q4 has only the lorax step (a quantized base has no dense gradient)")
    table = rows(args.base, args.layers, args.batch, args.seq, args.remat, args.random, variants, args.head_chunks,
                 args.remat_groups)
    suffix = ("" if args.remat == "none" else f"_remat_{args.remat}") + ("_random" if args.random else "")
    suffix += (f"_head_{args.head_chunks}" if args.head_chunks else "") + (
        f"_groups_{args.remat_groups}" if args.remat_groups else "")
    suffix += "" if (args.batch, args.seq) == (4, 128) else f"_batch_{args.batch}x{args.seq}"
    suffix += "" if jax.default_backend() == "cpu" else f"_{jax.default_backend()}"
    return written(args.out, f"memory_{args.base}{suffix}", table, markdown(table))


if __name__ == "__main__":
    main()
