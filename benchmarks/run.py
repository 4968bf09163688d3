"""LoRA vs full fine-tuning vs materialized LoRA vs PEFT: one command, a table, JSON and a chart.

    python benchmarks/run.py            # GPT-2-small widths and SmolLM2-135M, as in docs/performance.md (~15 min)
    python benchmarks/run.py --quick    # small widths, few steps: a smoke run (~1 min)

1. compiled costs of an Adam train step (XLA cost_analysis / memory_analysis);
2. wall time per step, variants interleaved in this process (median after warm-up), tokens/s;
3. the same against rank and sequence length (the chart);
4. inference: base vs merged vs unmerged LoRA forward;
5. SmolLM2-135M: lorax against PEFT on torch, each framework in its own process
   (`smollm_step.py`): step time, peak RSS, and the adapter file against the base's;
6. SmolLM2-135M decode tokens/s: KV cache, window recompute, transformers generate (`decode.py`).
Writes results/benchmark.json, results/benchmark.md and results/performance.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import decode
import jax
import walltime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
import gpt  # noqa: E402  (the GPT and its workload, shared with the tests)

QUICK = dict(d=128, heads=4, layers=2, vocab=512, batch=2, seq=32)
FULL, FLOOR = "full fine-tuning", "frozen model, input gradient only (LoRA's floor)"
DORA = "DoRA all-linear"
TARGETS = {"LoRA q,v": gpt.QV, "LoRA all-linear": gpt.ALL_LINEAR}
COLORS = {FULL: "tab:gray", "LoRA q,v": "tab:blue", "LoRA all-linear": "tab:green",
          "materialized LoRA all-linear": "tab:red", DORA: "tab:purple"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def train_programs(widths: dict, *, concrete: bool = True, floor: bool = False) -> dict:
    """Train steps by table label: full FT, LoRA on q,v and all-linear, materialized LoRA, and
    (``floor``) the frozen model's input gradient. Real arrays when ``concrete``, else shapes."""
    steps = gpt.train_steps(variants=("full", "frozen") if floor else ("full",), concrete=concrete, **widths)
    programs = {FULL: steps["full"]} | ({FLOOR: steps["frozen"]} if floor else {})
    for label, targets in TARGETS.items():
        variants = ("lora", "materialized") if targets == gpt.ALL_LINEAR else ("lora",)
        steps = gpt.train_steps(variants=variants, targets=targets, concrete=concrete, **widths)
        programs[label] = steps["lora"]
        if "materialized" in steps:
            programs["materialized LoRA all-linear"] = steps["materialized"]
    programs[DORA] = gpt.train_steps(variants=("lora",), kind="dora", concrete=concrete, **widths)["lora"]
    return programs


def compiled_table(widths: dict) -> list[dict]:
    """Flops and step memory of each variant, compiled from shapes (no donation)."""
    compiled = {label: gpt.cost(step, *args) for label, (step, args) in
                train_programs(widths, concrete=False).items()}
    full = compiled[FULL]
    return [dict(variant=label, gflops=c.flops / 1e9, flops_over_full=c.flops / full.flops,
                 step_mib=c.step_bytes / 2**20, memory_over_full=c.step_bytes / full.step_bytes)
            for label, c in compiled.items()]


def wall_table(widths: dict, repeats: int, warmup: int) -> list[dict]:
    timings = walltime.interleaved(train_programs(widths, floor=True), repeats=repeats, warmup=warmup)
    tokens = widths["batch"] * widths["seq"]
    return [dict(variant=k, s_per_step=t.seconds, tokens_per_s=tokens / t.seconds,
                 time_over_full=t.over(timings[FULL])) for k, t in timings.items()]


def rank_sweep(widths: dict, ranks, repeats: int, warmup: int) -> list[dict]:
    programs = {FULL: gpt.train_steps(variants=("full",), concrete=True, **widths)["full"]}
    for rank in ranks:
        for label, targets in TARGETS.items():
            programs[(label, rank)] = gpt.train_steps(variants=("lora",), targets=targets, rank=rank,
                                                        concrete=True, **widths)["lora"]
    timings = walltime.interleaved(programs, repeats=repeats, warmup=warmup)
    full = timings.pop(FULL)
    return [dict(variant=label, rank=rank, s_per_step=t.seconds, time_over_full=t.over(full),
                 flops_over_full=t.flops / full.flops) for (label, rank), t in timings.items()]


def seq_sweep(widths: dict, seqs, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for seq in seqs:
        w = dict(widths, seq=seq)
        timings = walltime.interleaved(train_programs(w), repeats=repeats, warmup=warmup)
        rows += [dict(variant=k, seq=seq, s_per_step=t.seconds,
                      gflops=t.flops / 1e9) for k, t in timings.items()]
    return rows


def inference_table(widths: dict, repeats: int, warmup: int) -> list[dict]:
    timings = walltime.interleaved(gpt.forwards(concrete=True, **widths), repeats=repeats, warmup=warmup,
                                   stateful=False)
    base = timings["base"]
    return [dict(variant=k, s_per_call=t.seconds, time_over_base=t.over(base),
                 flops_over_base=t.flops / base.flops) for k, t in timings.items()]


def smollm_runs(quick: bool) -> list[dict]:
    """Each framework in a fresh process: lorax and PEFT, LoRA on q,v and all-linear and DoRA on
    q,v; full FT for scale."""
    shape = ["--batch", "1", "--seq", "32", "--steps", "2", "--warmup", "1"] if quick else []
    jobs = [["lorax", "--targets", "qv"], ["peft", "--targets", "qv"],
            ["lorax", "--targets", "qv", "--dora"], ["peft", "--targets", "qv", "--dora"]]
    if not quick:
        jobs += [["lorax", "--targets", "all-linear"], ["peft", "--targets", "all-linear"],
                 ["jax-full"], ["torch-full"]]
    rows = []
    for job in jobs:
        print(f"  SmolLM2: {' '.join(job)} ...", flush=True)
        done = subprocess.run([sys.executable, str(HERE / "smollm_step.py"), *job, *shape],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"smollm_step.py {' '.join(job)} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def adapter_sizes(smollm: list[dict]) -> list[dict]:
    """Each adapter file against the GGUF checkpoint and the same weights in fp32."""
    import smollm as model_file
    from gguf import GGUFReader

    path = model_file.gguf_path()
    gguf, fp32 = path.stat().st_size, 4 * sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    return [dict(framework=r["framework"], kind=r["kind"], targets=r["targets"], adapter_bytes=r["adapter_bytes"],
                 over_gguf_q4=r["adapter_bytes"] / gguf, over_fp32_base=r["adapter_bytes"] / fp32,
                 gguf_bytes=gguf, fp32_base_bytes=fp32) for r in smollm if r["adapter_bytes"]]


def markdown(report: dict) -> str:
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"Machine: {report['machine']}. GPT widths {report['widths']}, Adam, fp32, r=8 unless stated.", "",
             "**Compiled train step** (XLA cost / memory analysis)", "",
             "| variant | GFLOPs | flops / full | step MiB | memory / full |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['gflops']:.2f} | {r['flops_over_full']:.3f} | {r['step_mib']:.0f} | "
              f"{r['memory_over_full']:.3f} |" for r in report["compiled"]]
    lines += ["", f"**Wall time per train step** (median of {report['repeats']}, interleaved in one process)", "",
              "| variant | s / step | tokens / s | time / full |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['time_over_full']:.3f} |"
              for r in report["wall"]]
    wall = {r["variant"]: r for r in report["wall"]}
    lines.append(f"\nDoRA / LoRA, all-linear step time: "
                 f"{wall[DORA]['s_per_step'] / wall['LoRA all-linear']['s_per_step']:.3f}")
    lines += ["", "**Inference** (forward, all-linear adapters)", "",
              "| variant | ms / call | time / base | flops / base |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {1e3 * r['s_per_call']:.1f} | {r['time_over_base']:.3f} | "
              f"{r['flops_over_base']:.4f} |" for r in report["inference"]]
    lines += ["", "**SmolLM2-135M train step, lorax vs PEFT** (each in its own process, same batch, targets, "
              "rank, fp32, AdamW)", "",
              "| framework | kind | targets | batch × seq | s / step | tokens / s | trained params | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['framework']} | {r['kind']} | {r['targets'] or 'all (full FT)'} | {r['batch']} × {r['seq']} | "
              f"{r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['trained_params']:,} | "
              f"{f(r['train_peak_rss_mib'], '.0f')} |" for r in report["smollm"]]
    by = {(r["framework"], r["kind"], r["targets"]): r for r in report["smollm"]}
    for kind, targets in (("lora", "qv"), ("lora", "all-linear"), ("dora", "qv")):
        if ("lorax", kind, targets) in by and ("peft", kind, targets) in by:
            a, b = by[("lorax", kind, targets)], by[("peft", kind, targets)]
            rss = None if None in (a["train_peak_rss_mib"], b["train_peak_rss_mib"]) else \
                a["train_peak_rss_mib"] / b["train_peak_rss_mib"]
            lines.append(f"\nlorax / PEFT, {kind} {targets}: time {a['s_per_step'] / b['s_per_step']:.3f}, "
                         f"peak RSS {f(rss, '.3f')}")
    lines += ["", "**Adapter file** (PEFT `adapter_model.safetensors`) against the base checkpoint", "",
              "| framework | kind | targets | adapter MiB | / GGUF Q4_1 file | / fp32 weights |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['framework']} | {r['kind']} | {r['targets']} | {r['adapter_bytes'] / 2**20:.2f} | "
              f"{r['over_gguf_q4']:.4f} | "
              f"{r['over_fp32_base']:.4f} |" for r in report["adapters"]]
    lines += ["", decode.markdown(report["decode"])]
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((t_rank, t_seq), (f_rank, f_seq)) = plt.subplots(2, 2, figsize=(10, 7))
    for label in TARGETS:
        rows = [r for r in report["ranks"] if r["variant"] == label]
        ranks = [r["rank"] for r in rows]
        t_rank.plot(ranks, [r["time_over_full"] for r in rows], "o-", color=COLORS[label], label=label)
        f_rank.plot(ranks, [r["flops_over_full"] for r in rows], "o-", color=COLORS[label], label=label)
    for ax, what in ((t_rank, "step time / full fine-tuning"), (f_rank, "flops / full fine-tuning")):
        ax.axhline(1.0, color="gray", ls="--", label="full fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=8)
    variants = dict.fromkeys(r["variant"] for r in report["seqs"])
    seqs = sorted({r["seq"] for r in report["seqs"]})
    for v in variants:
        rows = [r for r in report["seqs"] if r["variant"] == v]
        t_seq.plot([r["seq"] for r in rows], [r["s_per_step"] for r in rows], "o-", color=COLORS[v], label=v)
        f_seq.plot([r["seq"] for r in rows], [r["gflops"] for r in rows], "o-", color=COLORS[v], label=v)
    for ax, what in ((t_seq, "seconds / step"), (f_seq, "GFLOPs / step")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(q) for q in seqs])
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (rank 8)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle(f"Adam train step, GPT {report['widths']['d']}-wide × {report['widths']['layers']} layers, "
                 f"batch {report['widths']['batch']}; {report['machine'].split(',')[0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths and few steps: a smoke run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    widths = QUICK if args.quick else gpt.GPT2_SMALL
    repeats, warmup = (3, 1) if args.quick else (20, 2)
    ranks, seqs = ((1, 8), (16, 32)) if args.quick else ((1, 4, 8, 16, 64), (32, 64, 128, 256))

    report = dict(machine=machine(), widths=widths, repeats=repeats)
    print("compiled costs ...", flush=True)
    report["compiled"] = compiled_table(widths)
    print("wall time ...", flush=True)
    report["wall"] = wall_table(widths, repeats, warmup)
    print("rank sweep ...", flush=True)
    report["ranks"] = rank_sweep(widths, ranks, repeats, warmup)
    print("sequence sweep ...", flush=True)
    report["seqs"] = seq_sweep(widths, seqs, repeats, warmup)
    print("inference ...", flush=True)
    report["inference"] = inference_table(widths, repeats, warmup)
    print("SmolLM2-135M, one process per framework ...", flush=True)
    report["smollm"] = smollm_runs(args.quick)
    report["adapters"] = adapter_sizes(report["smollm"])
    print("SmolLM2-135M decode, one process per runtime ...", flush=True)
    report["decode"] = decode.runs(args.quick)

    table = markdown(report)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark.md").write_text(table + "\n")
    chart(report, args.out / "performance.png")
    print(f"\nwrote {args.out}/benchmark.json, benchmark.md, performance.png")
    return report


if __name__ == "__main__":
    main()
