"""lorax against llama.cpp on SmolLM2-135M with an adapter the main job trained and exported.

    pip install llama-cpp-python            # builds llama.cpp from source (minutes)
    PYTHONPATH=examples python3 benchmarks/llamacpp_agreement.py --steps 40   # from the repository root

Runs `examples/finetune_smollm.py` for ``--steps`` (its LoRA: q, v, r=8; it writes
``adapter.gguf`` with `lorax.llamacpp.save_adapter`), then compares lorax (the dequantised
weights, fp32) with llama.cpp (the Q4_1 GGUF, which quantises activations for its matmuls,
so logits cannot match exactly) with and without the adapter: greedy continuations of a few
prompts, top-1 agreement and next-token loss on held-out Shakespeare windows, and how often the
adapter changes the top-1 token in each runtime. Prints a table; writes results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPTS = ("HAMLET.\nTo be, or not to be,", "ROMEO.\nBut soft, what light", "KING LEAR.\nBlow, winds,")


def xent(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy of ``logits`` [t, vocab] against ``ids`` [t]."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]]))


class LlamaCpp:
    """llama.cpp through llama-cpp-python: logits of a window and greedy continuations."""

    def __init__(self, adapter: Path | None):
        from lorax_examples import smollm

        self.llm = smollm.llama_cpp_model(adapter)

    def logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[: len(ids)])

    def greedy(self, ids, new: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        out = []
        for _ in range(new):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="main-job training steps before export")
    p.add_argument("--windows", type=int, default=4, help="held-out windows")
    p.add_argument("--window", type=int, default=64, help="tokens per held-out window")
    p.add_argument("--new", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    import finetune_smollm
    import jax
    from lorax_examples import generate, smollm
    from lorax_examples.llama import Llama, cached_step, init_cache

    import lorax

    run = Path(tempfile.mkdtemp(prefix="llamacpp-agreement-"))
    finetune_smollm.main(["--steps", str(args.steps), "--eval-every", str(args.steps + 1), "--eval-batches", "1",
                          "--new-tokens", "4", "--out", str(run)])
    config, base, tok = smollm.load()
    params = lorax.load((run / "adapter").absolute(), base)
    fn = lambda p, ids: Llama(config).apply(p, ids)  # noqa: E731
    step = lorax.lora(cached_step(config))
    empty = lambda b, n: init_cache(config, b, n)  # noqa: E731
    forward = jax.jit(lorax.lora(fn))

    _, test_ids = finetune_smollm.token_splits(tok, finetune_smollm.shakespeare_texts())
    starts = np.random.default_rng(1).integers(0, len(test_ids) - args.window, args.windows)
    windows = [test_ids[s: s + args.window] for s in starts]
    prompts = [tok.encode(text).ids for text in PROMPTS]

    report: dict = dict(steps=args.steps, windows=args.windows, window=args.window, new=args.new, runtimes={})
    top1: dict = {}
    for label, tree, adapter in (("base", base, None), ("adapter", params, run / "adapter.gguf")):
        cpp = LlamaCpp(adapter)
        ours = [np.asarray(forward(tree, w[None]))[0] for w in windows]
        theirs = [cpp.logits(w) for w in windows]
        top1[label] = ([o.argmax(-1) for o in ours], [t.argmax(-1) for t in theirs])
        lorax_text = generate.generate(step, tree, empty, prompts, max_new=args.new)
        cpp_text = [cpp.greedy(ids, args.new) for ids in prompts]
        report["runtimes"][label] = dict(
            top1_agreement=float(np.mean(np.concatenate([o.argmax(-1) == t.argmax(-1) for o, t in zip(ours, theirs)]))),
            lorax_loss=float(np.mean([xent(o, w) for o, w in zip(ours, windows)])),
            llamacpp_loss=float(np.mean([xent(t, w) for t, w in zip(theirs, windows)])),
            greedy_identical=sum(a == b for a, b in zip(lorax_text, cpp_text)),
            greedy_common_prefix=[next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                                  for a, b in zip(lorax_text, cpp_text)],
            lorax_text=[tok.decode(t) for t in lorax_text], llamacpp_text=[tok.decode(t) for t in cpp_text])
        del cpp
    for who, index in (("lorax", 0), ("llamacpp", 1)):
        changed = np.concatenate([a != b for a, b in zip(top1["base"][index], top1["adapter"][index])])
        report[f"adapter_changes_top1_{who}"] = float(np.mean(changed))

    rows = report["runtimes"]
    table = "\n".join([
        f"**lorax vs llama.cpp, SmolLM2-135M** (main-job LoRA q,v r=8 after {args.steps} steps; "
        f"{args.windows} held-out windows of {args.window} tokens; {len(PROMPTS)} prompts × {args.new} greedy tokens)",
        "", "| | top-1 agreement | held-out loss lorax | held-out loss llama.cpp | greedy identical | "
        "common prefix |", "|---|---|---|---|---|---|",
        *[f"| {k} | {r['top1_agreement']:.3f} | {r['lorax_loss']:.3f} | {r['llamacpp_loss']:.3f} | "
          f"{r['greedy_identical']}/{len(PROMPTS)} | {r['greedy_common_prefix']} |" for k, r in rows.items()],
        "", f"the adapter changes the top-1 token at {report['adapter_changes_top1_lorax']:.1%} of positions in lorax, "
        f"{report['adapter_changes_top1_llamacpp']:.1%} in llama.cpp"])
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}/llamacpp.json")
    return report


if __name__ == "__main__":
    main()
