"""Compiled-cost benchmark: LoRA vs full fine-tuning vs materialized LoRA.

    python benchmarks/run.py            # GPT-2-small widths, as in the README
    python benchmarks/run.py --quick    # small widths, a smoke run

Prints a markdown table and writes JSON (XLA cost_analysis / memory_analysis of the
compiled Adam train step; deterministic, no step is run).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import jax

import costs

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths for a smoke run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "costs.json")
    args = parser.parse_args(argv)
    widths = (dict(d=128, heads=4, layers=2, vocab=512, batch=2, seq=32) if args.quick else
              dict(d=768, heads=12, layers=4, vocab=2048, batch=4, seq=128))

    rows = []
    full = costs.train_step_costs(**widths, variants=("full",))["full"]
    rows.append(("full fine-tuning", "-", full))
    for label, targets in (("LoRA q,v", costs.QV), ("LoRA all-linear", costs.ALL_LINEAR)):
        c = costs.train_step_costs(**widths, targets=targets, variants=("lora",))["lora"]
        rows.append((label, 8, c))
    mat = costs.train_step_costs(**widths, variants=("materialized",))["materialized"]
    rows.append(("materialized LoRA all-linear (W+sAB each step)", 8, mat))
    for rank in (1, 64):
        rows.append((f"LoRA all-linear r={rank}", rank,
                     costs.train_step_costs(**widths, rank=rank, variants=("lora",))["lora"]))
    weight_bound = dict(widths, batch=1, seq=32)
    wb = costs.train_step_costs(**weight_bound, variants=("full", "lora"))
    inference = costs.inference_costs(**widths)

    lines = [f"Train step (Adam, fp32), widths {widths}, {jax.default_backend()} / {platform.processor() or platform.machine()}",
             "", "| variant | rank | GFLOPs | flops / full | step MiB | MiB / full |", "|---|---|---|---|---|---|"]
    for label, rank, c in rows:
        lines.append(f"| {label} | {rank} | {c.flops / 1e9:.2f} | {c.flops / full.flops:.3f} | "
                     f"{c.step_bytes / 2**20:.1f} | {c.step_bytes / full.step_bytes:.3f} |")
    lines += ["", f"Weight-bound step (batch 1, seq 32): LoRA memory / full = "
              f"{wb['lora'].step_bytes / wb['full'].step_bytes:.3f}",
              f"Inference flops: merged / base = {inference['merged'].flops / inference['base'].flops:.4f}, "
              f"unmerged / base = {inference['unmerged'].flops / inference['base'].flops:.4f}"]
    print("\n".join(lines))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"widths": widths, "backend": jax.default_backend(), "jax": jax.__version__,
              "train": [{"variant": label, "rank": rank, "flops": c.flops, "step_bytes": c.step_bytes,
                         "flops_over_full": c.flops / full.flops} for label, rank, c in rows],
              "weight_bound_memory_ratio": wb["lora"].step_bytes / wb["full"].step_bytes,
              "inference_flops": {k: v.flops for k, v in inference.items()}}
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
