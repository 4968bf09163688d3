"""One framework's SmolLM2-135M train step, timed in a process of its own; prints one JSON line.

Run from the repository root, the examples' package on the path:
PYTHONPATH=examples python benchmarks/smollm_step.py ...

    python benchmarks/smollm_step.py lorax --targets qv
    python benchmarks/smollm_step.py peft --targets all-linear
    python benchmarks/smollm_step.py torch-full          # full fine-tuning, for scale
    python benchmarks/smollm_step.py peft --targets qv --dora   # DoRA in both frameworks
    python benchmarks/smollm_step.py lorax --targets qv --base q4   # QLoRA over the GGUF's 4-bit blocks
    python benchmarks/smollm_step.py peft --targets qv --base bf16  # a bf16 base, fp32 adapters (both)

lorax runs the JAX LLaMA of ``examples/`` on the GGUF weights; PEFT runs transformers' load
of the same file. Both: fp32, AdamW, the same random token batch, rank, alpha and targets, no
dropout. ``--base bf16``: bf16 weights and fp32 adapters in both; torch computes in bf16, lorax's
model gives its matmuls bf16 operands and keeps fp32 activations.

The step's matmul flops (counted from the jaxpr for JAX, torch's flop counter) over its time, as
a share of the same framework's plain matmul rate measured in the same process (`roofline.py`),
is its efficiency. Peak RSS is the process's high-water mark reset after loading (the training
phase, model included) and, separately, over the whole process. The time to the first step is
what a notebook pays after each change: for JAX, tracing and compiling the step plus running it
once; for torch, the first step. The row names the allocator the environment selects
(`processes.examples_env`) and the kernel's transparent huge page mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import processes
import roofline

FRAMEWORKS = ("lorax", "jax-full", "peft", "torch-full")
PEFT_TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
LORAX_TARGETS = {"qv": r".*/(q|v)_proj/kernel", "all-linear": "all-linear"}


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokens(batch: int, seq: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).astype(np.int32)


def _adapter_bytes(folder: Path) -> tuple[int, int]:
    """``(file bytes, tensor bytes)`` of a PEFT folder's safetensors file: the file is an 8-byte
    header length, the JSON header (names, shapes, metadata such as lorax's base fingerprint), then
    the tensors."""
    path = folder / "adapter_model.safetensors"
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    size = path.stat().st_size
    return size, size - 8 - header


def lorax_step(args):
    """``(step, trainable_count, adapter_bytes, flops, compiled)``; ``step()`` runs one step and
    waits; ``flops`` are its matmul flops, every layer counted (`flops.matmul_flops`)."""
    import jax
    import optax
    from lorax_examples import smollm
    from lorax_examples.flops import matmul_flops
    from lorax_examples.llama import Llama, bf16_as_bits, with_memory_options

    import lorax
    import lorax.peft

    config, base, _ = smollm.load(base=args.base, layers=args.layers)
    config = with_memory_options(config, args.remat, args.head_chunks, args.remat_groups)
    config = dataclasses.replace(config, attention_blocks=args.attention_blocks)  # checked by `parsed`
    fn = lambda p, ids: Llama(config).apply(p, ids)  # noqa: E731
    xent = lambda p, ids: Llama(config).apply(p, ids[:, :-1], targets=ids[:, 1:])  # noqa: E731
    ids = jax.numpy.asarray(_tokens(args.batch, args.seq, config.vocab))
    tx = optax.adamw(1e-4, weight_decay=0.0)

    if args.framework == "jax-full":
        state, rest, forward, adapter_bytes = base, (), xent, None
    else:
        lora_config = lorax.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=LORAX_TARGETS[args.targets],
                                       use_dora=args.dora)  # over a bf16 base the factors are fp32
        base = bf16_as_bits(base, config.head_chunks)  # what the step slices in a loop, as bits
        params = lorax.init(jax.random.key(0), lora_config, fn, base, ids[:, :-1])
        state, frozen = lorax.split(params)
        rest, forward = (frozen,), lambda t, f, x: lorax.lora(xent)(lorax.combine(t, f), x)
        with tempfile.TemporaryDirectory() as tmp:
            lorax.peft.save_peft(Path(tmp), params, lorax.peft.LLAMA)
            adapter_bytes = _adapter_bytes(Path(tmp))
    count = sum(x.size for x in jax.tree.leaves(state))
    opt = tx.init(state)

    @jax.jit
    def step(state, opt, *rest_and_ids):
        *rest, ids = rest_and_ids
        loss, g = jax.value_and_grad(lambda s: forward(s, *rest, ids))(state)
        updates, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    start = time.perf_counter()  # what a notebook pays on every change: trace, lower, compile
    compiled = step.lower(state, opt, *rest, ids).compile()
    compile_s = time.perf_counter() - start
    box = [state, opt]

    def run():
        box[0], box[1], loss = compiled(box[0], box[1], *rest, ids)
        return float(loss)

    return run, count, adapter_bytes, matmul_flops(step, state, opt, *rest, ids), compiled, compile_s


def torch_step(args):
    import torch
    from lorax_examples import smollm

    if args.base == "q4":
        raise SystemExit("--base q4 is lorax's (QLoRA over the GGUF's blocks); torch runs fp32 or bf16")
    model = smollm.transformers_model("bfloat16" if args.base == "bf16" else "float32", args.layers)
    adapter_bytes = None
    if args.framework == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=PEFT_TARGETS[args.targets], use_dora=args.dora))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(_tokens(args.batch, args.seq, model.config.vocab_size)).long()

    def backward():
        out = model(input_ids=ids[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss

    def run():
        loss = backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if args.framework == "peft":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            adapter_bytes = _adapter_bytes(Path(tmp))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # forward and backward, no update: the weights stay
        backward()
    opt.zero_grad(set_to_none=True)
    return run, sum(p.numel() for p in trained), adapter_bytes, counter.get_total_flops(), None, None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("framework", choices=FRAMEWORKS)
    p.add_argument("--targets", choices=tuple(PEFT_TARGETS), default="qv")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dora", action="store_true", help="DoRA adapters instead of LoRA")
    p.add_argument("--base", choices=("fp32", "bf16", "q4"), default="fp32",
                   help="the base: fp32 weights; bf16 weights and compute (adapters stay fp32); or, lorax only, "
                        "the GGUF's Q4_1/Q8_0 blocks kept as stored (QLoRA)")
    p.add_argument("--remat", default="none",
                   help="JAX: recompute in the backward: none, full, or a jax.checkpoint_policies name")
    p.add_argument("--head-chunks", type=int, default=0,
                   help="JAX: the loss over this many slices of the vocabulary (a divisor of 49152); "
                        "0: the whole vocabulary, 128 tokens at a time")
    p.add_argument("--remat-groups", type=int, default=0,
                   help="JAX: the layer loop as this many groups, each recomputed in the backward (for adapters: "
                        "full fine-tuning sums its stacks' gradients whole in each group); 0: one loop")
    p.add_argument("--attention-blocks", type=int, default=4,
                   help="JAX: causal attention as this many query blocks, each over the keys up to its end; 1: one "
                        "masked block")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, help="keep the first N decoder layers (a smoke run); all 30 by default")
    return p


def parsed(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``p``'s arguments (a `parser`, perhaps extended), with ``--remat-groups`` checked against
    the layers kept and ``--attention-blocks`` from 1: a bad value is a usage error."""
    from lorax_examples import smollm
    from lorax_examples.llama import attention_blocks_setting, remat_groups_setting

    args = p.parse_args(argv)
    try:
        remat_groups_setting(args.remat_groups, args.layers or smollm.LAYERS)
        attention_blocks_setting(args.attention_blocks)
    except ValueError as refused:
        p.error(f"--{refused}")
    return args


def step_of(args):
    """`lorax_step` or `torch_step`, as ``args.framework`` says."""
    return (lorax_step if args.framework in ("lorax", "jax-full") else torch_step)(args)


def main(argv=None):
    from lorax_examples import smollm

    args = parsed(parser(__doc__.splitlines()[0]), argv)

    run, count, adapter_bytes, flops, compiled, compile_s = step_of(args)
    load_peak = _peak_rss_mib()
    reset = _reset_peak_rss()
    start = time.perf_counter()
    losses = [run()]
    first_step_s = (compile_s or 0.0) + time.perf_counter() - start  # JAX: + trace and compile
    losses += [run() for _ in range(args.warmup - 1)]
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(run())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    dtype = roofline.DTYPES["fp32" if args.base == "fp32" else "bf16"]  # the products' operands (q4: bf16 too)
    peak = (roofline.jax_gflops if compiled else roofline.torch_gflops)(dtype=dtype)["peak"]
    print(json.dumps(dict(
        framework=args.framework, targets=None if "full" in args.framework else args.targets, rank=args.rank,
        kind="full" if "full" in args.framework else "dora" if args.dora else "lora",
        base=args.base, layers=args.layers or smollm.LAYERS, remat=args.remat, head_chunks=args.head_chunks,
        attention_blocks=args.attention_blocks,
        remat_groups=args.remat_groups, batch=args.batch, seq=args.seq, s_per_step=median,
        tokens_per_s=args.batch * args.seq / median,
        trained_params=count, train_peak_rss_mib=_peak_rss_mib() if reset else None,
        process_peak_rss_mib=max(load_peak, _peak_rss_mib()), adapter_bytes=adapter_bytes and adapter_bytes[0],
        adapter_tensor_bytes=adapter_bytes and adapter_bytes[1],
        first_loss=losses[0], last_loss=losses[-1], first_step_s=first_step_s, compile_s=compile_s,
        allocator=processes.allocator(), transparent_huge_pages=processes.transparent_huge_pages(),
        machine=roofline.machine(), step_gflop=flops / 1e9,
        matmul_peak_gflops=peak, efficiency=flops / median / 1e9 / peak)))


if __name__ == "__main__":
    main()
