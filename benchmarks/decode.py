"""Decode tokens/s on SmolLM2-135M with a LoRA adapter (q, v, r=8): lorax with the KV cache, lorax
re-running the window for every token (the example's old decoder), and transformers' ``generate``
on torch with a PEFT adapter. Each runs in a process of its own; one command prints the table
and writes results/decode.json and results/decode.md.

    PYTHONPATH=examples python3 benchmarks/decode.py           # prompt 32 tokens, 64 new, batch 1
    PYTHONPATH=examples python3 benchmarks/decode.py --quick   # 8 new tokens: a smoke run

(run from the repository root, with the examples' package on the path).

Decode rate = (new - 1) / (time for ``new`` tokens - time for 1 token): the prefill and the
first token are taken out; median of ``--repeats`` after a warm-up (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lorax_examples import smollm
from processes import examples_env
from report_files import written

HERE = Path(__file__).resolve().parent
RUNTIMES = {"lorax-cache": "lorax, KV cache", "lorax-recompute": "lorax, window recompute",
            "transformers": "transformers generate + PEFT (torch)"}
TARGETS = r".*/(q|v)_proj/kernel"


def _prompt(batch: int, length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)


def lorax_generator(args):
    """``run(new) -> tokens`` for lorax, with the cache or by window recompute."""
    import jax
    from lorax_examples import generate
    from lorax_examples.llama import Llama, cached_step, init_cache

    import lorax

    config, base, _ = smollm.load(layers=args.layers)
    config = type(config)(**{**config.__dict__, "remat": False})
    prompts = _prompt(args.batch, args.prompt, config.vocab)
    fn = lambda p, ids: Llama(config).apply(p, ids)  # noqa: E731
    params = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=8, alpha=16.0, targets=TARGETS), fn, base, prompts)
    slots = args.prompt + args.new
    if args.runtime == "lorax-cache":
        step = lorax.lora(cached_step(config))
        empty = lambda b, n: init_cache(config, b, n)  # noqa: E731
        return lambda new: generate.generate(step, params, empty, prompts.tolist(), max_new=new, slots=slots)
    if args.batch != 1:
        raise SystemExit("window recompute decodes one prompt at a time: use --batch 1")
    forward = lorax.lora(fn)
    return lambda new: generate.greedy_by_recompute(forward, params, prompts[0].tolist(), max_new=new, window=slots)


def transformers_generator(args):
    import torch
    from peft import LoraConfig, get_peft_model

    model = smollm.transformers_model("float32", args.layers)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model.eval()
    ids = torch.from_numpy(_prompt(args.batch, args.prompt, model.config.vocab_size)).long()

    def run(new):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)

    return run


def measure(args) -> dict:
    run = (transformers_generator if args.runtime == "transformers" else lorax_generator)(args)
    timings = {}
    for new in (1, args.new):
        run(new)  # warm-up: compilation, allocation
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(new)
            samples.append(time.perf_counter() - start)
        timings[new] = statistics.median(samples)
    decode = max(timings[args.new] - timings[1], 1e-9)
    return dict(runtime=args.runtime, label=RUNTIMES[args.runtime], layers=args.layers or smollm.LAYERS,
                batch=args.batch, prompt=args.prompt, new=args.new, first_token_s=timings[1], total_s=timings[args.new],
                decode_tokens_per_s=args.batch * (args.new - 1) / decode)


def markdown(rows: list[dict]) -> str:
    cache = next((r for r in rows if r["runtime"] == "lorax-cache"), None)
    lines = [f"**Decode, {smollm.label(rows[0].get('layers'))} + LoRA q,v r=8** (batch {rows[0]['batch']}, "
             f"prompt {rows[0]['prompt']} "
             f"tokens, {rows[0]['new']} new, greedy, fp32; each runtime in its own process)", "",
             "| runtime | prefill + 1st token ms | decode tokens / s | lorax cache / this |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {1e3 * r['first_token_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
              f"{cache['decode_tokens_per_s'] / r['decode_tokens_per_s'] if cache else float('nan'):.2f} |"
              for r in rows]
    return "\n".join(lines)


def runs(quick: bool, repeats: int | None = None, layers: int | None = None) -> list[dict]:
    """Each runtime in a fresh process; one row per runtime (``layers``: the first N decoder layers)."""
    shape = ["--new", "8", "--repeats", "1"] if quick else ["--repeats", str(repeats or 3)]
    shape += [] if layers is None else ["--layers", str(layers)]
    rows = []
    for runtime in RUNTIMES:
        print(f"  decode: {runtime} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--runtime", runtime, *shape], capture_output=True, text=True,
                              env=examples_env())
        if done.returncode:
            raise SystemExit(f"decode.py --runtime {runtime} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", choices=tuple(RUNTIMES), help="measure one runtime here and print a JSON line")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="8 new tokens, one repeat: a smoke run")
    p.add_argument("--layers", type=int, help="keep the first N decoder layers (a smoke run); all 30 by default")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.runtime:
        print(json.dumps(measure(args)))
        return None
    rows = runs(args.quick, args.repeats, args.layers)
    return written(args.out, "decode", rows, markdown(rows))


if __name__ == "__main__":
    main()
