"""LoRA vs full fine-tuning vs materialized LoRA vs PEFT: one command, a table, JSON and a chart.

Run from the repository root, the examples' package on the path:
PYTHONPATH=examples python3 benchmarks/run.py ...

    python benchmarks/run.py            # GPT-2-small widths and SmolLM2-135M, as in docs/performance.md (~15 min)
    python benchmarks/run.py --quick    # small widths, few steps: a smoke run (~5 min on 2 cores)
    python benchmarks/run.py --smoke    # --quick at each section's smallest configuration: the tests' run
    python benchmarks/run.py --only qlora   # the QLoRA rows alone (GPT and SmolLM2), to results/qlora.*
    python benchmarks/run.py --only smollm  # the roofline and SmolLM2 LoRA lorax vs PEFT alone, to results/smollm.*

0. the roofline: this machine's plain matmul rate in JAX and torch (`roofline.py`);
1. compiled costs of an Adam train step (matmul flops from the jaxpr, XLA's memory_analysis);
2. wall time per step, variants interleaved in this process (median after warm-up), tokens/s;
3. the same against rank and sequence length (the chart); every adapter kind (LoRA, DoRA, IA³,
   LoHa, LoKr, OFT with blocks of 32) on all-linear: trainable parameters, compiled flops and temporaries, and wall
   time against LoRA's, side by side in this process;
4. inference: base vs merged vs unmerged LoRA forward, and where the unmerged time goes (rank,
   targets, one adapter of a bank);
5. serving 8 adapters: one batch mixing them (an adapter per example) against the same batch
   with one adapter and against one call per adapter;
6. SmolLM2-135M: lorax against PEFT on torch, each framework in its own process
   (`smollm_step.py`): step time, peak RSS, efficiency against the machine's matmul rate, and
   the adapter file against the base's (``--only smollm``: each framework's LoRA also with glibc's
   huge-page tunable, `processes.examples_env`;
   `allocators.py` adds tcmalloc);
7. QLoRA: the GPT's train step over NF4 kernels against LoRA's (wall time side by side, XLA
   flops, the base's bytes among the step's arguments), and SmolLM2 over the GGUF's Q4_1
   blocks against the fp32 base (each in its own process).
8. SmolLM2-135M decode tokens/s: KV cache, window recompute, transformers generate (`decode.py`).
9. SmolLM2-135M train-step memory (`memory.py`): full fine-tuning, LoRA written by hand and lorax
   on the fp32, bf16 and Q4_1 bases, from XLA's compiled programs (deterministic).
Writes results/benchmark.json, results/benchmark.md and results/performance.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import decode
import jax
import jax.numpy as jnp
import memory as step_memory
import roofline
import walltime
from lorax_examples import gpt, smollm  # the models and workloads, shared with the tests
from processes import examples_env, median_run, smollm_step
from report_files import written

HERE = Path(__file__).resolve().parent

import lorax  # noqa: E402

QUICK = dict(d=128, heads=4, layers=2, vocab=512, batch=2, seq=32)
FULL, FLOOR = "full fine-tuning", "frozen model, input gradient only (LoRA's floor)"
DORA = "DoRA all-linear"
QLORA = "QLoRA NF4 all-linear"
TARGETS = {"LoRA q,v": gpt.QV, "LoRA all-linear": gpt.ALL_LINEAR}
COLORS = {FULL: "tab:gray", "LoRA q,v": "tab:blue", "LoRA all-linear": "tab:green",
          "materialized LoRA all-linear": "tab:red", DORA: "tab:purple"}


def machine() -> str:
    return f"{roofline.describe(roofline.machine())}, jax {jax.__version__} ({jax.default_backend()})"


def roofline_rates(dtypes=("fp32",)) -> dict:
    """Plain matmul GFLOP/s on this machine at the SmolLM2 projections' shapes, per operand dtype:
    JAX here, torch in a process of its own (as its training runs are)."""
    rates = {}
    for dtype in dtypes:
        done = subprocess.run([sys.executable, str(HERE / "roofline.py"), "torch", dtype], capture_output=True,
                              text=True, env=examples_env())
        suffix = "" if dtype == "fp32" else f" {dtype}"
        rates[f"jax{suffix}"] = roofline.jax_gflops(dtype=roofline.DTYPES[dtype])
        rates[f"torch{suffix}"] = json.loads(done.stdout.strip().splitlines()[-1])["gflops"] if done.returncode == 0 \
            else None
    return rates


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


def wall_table(widths: dict, repeats: int, warmup: int) -> tuple[list[dict], dict]:
    """The rows, and the timings by label (the sequence sweep reuses them at this length)."""
    timings = walltime.interleaved(train_programs(widths, floor=True), repeats=repeats, warmup=warmup)
    tokens = widths["batch"] * widths["seq"]
    return [dict(variant=k, s_per_step=t.seconds, tokens_per_s=tokens / t.seconds, gflop=t.flops / 1e9,
                 gflops_per_s=t.flops / t.seconds / 1e9, time_over_full=t.over(timings[FULL]))
            for k, t in timings.items()], timings


KINDS = ("lora", "dora", "ia3", "loha", "lokr", "oft", "vera")


def kinds_table(widths: dict, repeats: int, warmup: int) -> list[dict]:
    """Each adapter kind's all-linear Adam step against LoRA's: trainable parameters, matmul
    flops and XLA's temporaries of the step (donated, as timed), wall time interleaved in this
    process; each step compiled once."""
    programs = {kind: gpt.train_steps(variants=("lora",), kind=kind, concrete=True, **widths)["lora"]
                for kind in KINDS}
    sizes = {kind: sum(x.size for x in jax.tree.leaves(args[0])) for kind, (_, args) in programs.items()}
    timings = walltime.interleaved(programs, repeats=repeats, warmup=warmup)
    lora = timings["lora"]
    return [dict(kind=kind, trainable=sizes[kind], trainable_over_lora=sizes[kind] / sizes["lora"],
                 gflops=t.flops / 1e9, flops_over_lora=t.flops / lora.flops, temp_mib=t.temp_bytes / 2**20,
                 temp_over_lora=t.temp_bytes / lora.temp_bytes, s_per_step=t.seconds,
                 time_over_lora=t.over(lora))
            for kind, t in timings.items()]


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


def seq_sweep(widths: dict, seqs, repeats: int, warmup: int, measured: dict) -> list[dict]:
    """Train-step time against sequence length; at the widths' own length, the wall table's
    ``measured`` timings (the same programs) are reused rather than run again."""
    rows = []
    for seq in seqs:
        if seq == widths["seq"]:
            timings = {k: t for k, t in measured.items() if k != FLOOR}
        else:
            timings = walltime.interleaved(train_programs(dict(widths, seq=seq)), repeats=repeats, warmup=warmup)
        rows += [dict(variant=k, seq=seq, s_per_step=t.seconds,
                      gflops=t.flops / 1e9) for k, t in timings.items()]
    return rows


def inference_table(widths: dict, repeats: int, warmup: int) -> list[dict]:
    timings = walltime.interleaved(gpt.forwards(concrete=True, **widths), repeats=repeats, warmup=warmup,
                                   stateful=False)
    base = timings["base"]
    return [dict(variant=k, s_per_call=t.seconds, time_over_base=t.over(base),
                 flops_over_base=t.flops / base.flops) for k, t in timings.items()]


def qlora_table(widths: dict, repeats: int, warmup: int) -> list[dict]:
    """LoRA all-linear over the fp32 GPT and over its kernels in NF4: s/step side by side, XLA
    flops, and the base's bytes among the step's arguments (XLA's memory analysis, less the
    adapters, optimizer state, batch and the weights both keep in fp32) per kernel parameter."""
    import re

    steps = gpt.train_steps(variants=("lora", "qlora"), concrete=True, **widths)
    labels = {"LoRA all-linear": "lora", QLORA: "qlora"}
    timings = walltime.interleaved({label: steps[key] for label, key in labels.items()}, repeats=repeats,
                                   warmup=warmup)
    plain = gpt.model(**{**gpt.GPT2_SMALL, **widths}, concrete=False)[1]
    leaves = [("/".join(str(k.key) for k in path), x) for path, x in jax.tree_util.tree_leaves_with_path(plain)]
    kernel_params = sum(x.size for name, x in leaves if re.fullmatch(gpt.KERNELS, name))
    fp32_rest = sum(x.size * x.dtype.itemsize for name, x in leaves if not re.fullmatch(gpt.KERNELS, name))
    rows = []
    for label, key in labels.items():
        step, (trainable, opt, frozen, ids) = steps[key]
        c = gpt.cost(step, trainable, opt, frozen, ids)
        others = sum(x.nbytes for x in jax.tree.leaves((trainable, opt, ids))) + fp32_rest
        base = c.argument_bytes - others
        rows.append(dict(variant=label, s_per_step=timings[label].seconds,
                         time_over_lora=timings[label].over(timings["LoRA all-linear"]), gflops=c.flops / 1e9,
                         argument_mib=c.argument_bytes / 2**20, step_mib=c.step_bytes / 2**20,
                         kernel_mib=base / 2**20, kernel_bits_per_param=8 * base / kernel_params))
    return rows


def smollm_qlora_runs(quick: bool, layers: int | None = None, earlier: list[dict] = ()) -> list[dict]:
    """SmolLM2 LoRA on q,v over the fp32 base and over the GGUF's blocks, each in its own process;
    a run of ``earlier`` (`smollm_runs`' rows) with the same arguments is reused, not repeated."""
    shape = ["--batch", "1", "--seq", "32", "--steps", "2", "--warmup", "1"] if quick else ["--steps", "5"]
    shape += _layers(layers)
    done = {tuple(row["argv"]): row for row in earlier}
    rows = []
    for base in ("fp32", "q4"):
        argv = ["lorax", "--targets", "qv", *([] if base == "fp32" else ["--base", base]), *shape]
        rows.append(done.get(tuple(argv)) or smollm_step(argv))
    return rows


def qlora_markdown(report: dict) -> str:
    lines = ["**QLoRA**: the GPT's kernels in NF4 (blocks of 64, fp32 absmax) under LoRA all-linear, against "
             f"LoRA over fp32 (median of {report['repeats']}, interleaved)", "",
             "| variant | s / step | time / LoRA | GFLOPs | argument MiB | kernels MiB | kernel bits / param |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['s_per_step']:.3f} | {r['time_over_lora']:.3f} | {r['gflops']:.2f} | "
              f"{r['argument_mib']:.1f} | {r['kernel_mib']:.1f} | {r['kernel_bits_per_param']:.2f} |"
              for r in report["qlora"]]
    model = smollm.label(report["smollm_qlora"][0].get("layers"))
    lines += ["", f"**{model}, LoRA q,v over the fp32 base and over the GGUF's Q4_1 blocks** (own processes)", "",
              "| base | batch × seq | s / step | tokens / s | training peak RSS MiB | process peak RSS MiB |",
              "|---|---|---|---|---|---|"]
    f = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
    lines += [f"| {r['base']} | {r['batch']} × {r['seq']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{f(r['train_peak_rss_mib'])} | {f(r['process_peak_rss_mib'])} |" for r in report["smollm_qlora"]]
    return "\n".join(lines)


def overhead_table(widths: dict, repeats: int, warmup: int) -> list[dict]:
    """Where the unmerged forward's extra time goes: the same forward against the base with
    all-linear adapters of rank 1, 8 and 64, q,v adapters, and one adapter of a `LoraBank`."""
    fn, params, ids = gpt.model(**widths, concrete=True)
    programs = {"base": (fn, (params, ids))}
    for label, targets, rank in (("all-linear r=1", gpt.ALL_LINEAR, 1), ("all-linear r=8", gpt.ALL_LINEAR, 8),
                                 ("all-linear r=64", gpt.ALL_LINEAR, 64), ("q,v r=8", gpt.QV, 8)):
        programs[label] = (lorax.lora(fn), (gpt._adapt(fn, params, ids, rank, targets, True), ids))
    forward, serving = gpt.serving(count=2, **widths)
    programs["bank of 2, one adapter r=8"] = serving["one adapter"]
    timings = walltime.interleaved(programs, repeats=repeats, warmup=warmup, stateful=False)
    base = timings["base"]
    return [dict(variant=k, s_per_call=t.seconds, time_over_base=t.over(base), flops_over_base=t.flops / base.flops)
            for k, t in timings.items()]


def serving_table(widths: dict, repeats: int, warmup: int, count: int = 8) -> list[dict]:
    """Tokens/s of one batch whose ``count`` examples each use their own adapter (a per-example
    index), against the same batch with one adapter and against one call per adapter."""
    widths = dict(widths, batch=count)
    forward, programs = gpt.serving(count=count, **widths)
    compiled = {name: jax.jit(fn).lower(*args).compile() for name, (fn, args) in programs.items()}
    bank, _, ids = programs["mixed"][1]
    call = lambda name: lambda: jax.block_until_ready(compiled[name](*programs[name][1]))  # noqa: E731
    runs = {name: call(name) for name in ("base", "one adapter", "mixed")}
    runs[f"{count} sequential calls"] = lambda: jax.block_until_ready(
        [compiled["alone"](bank, jnp.int32(i), ids[i:i + 1]) for i in range(count)])
    times = walltime.rounds(runs, repeats=repeats, warmup=warmup)
    tokens = count * widths["seq"]
    mixed = times["mixed"]
    ratio = lambda other: statistics.median(o / m for o, m in zip(other, mixed))  # noqa: E731
    return [dict(variant=k, s_per_call=statistics.median(t), tokens_per_s=tokens / statistics.median(t),
                 mixed_throughput_over_this=ratio(t)) for k, t in times.items()]


def _layers(layers: int | None) -> list[str]:
    """`smollm_step.py`'s arguments for the first ``layers`` decoder layers (None: all)."""
    return [] if layers is None else ["--layers", str(layers)]


MEMORY_OPTIONS = dict(remat="full", head_chunks=8)  # each layer recomputed, the loss over 8 vocabulary slices
ALLOCATOR_LABELS = {"glibc-huge-pages": "huge pages", "tcmalloc": "tcmalloc"}  # as the options column names them
MEMORY_ARGV = ("--remat", MEMORY_OPTIONS["remat"], "--head-chunks", str(MEMORY_OPTIONS["head_chunks"]))


def _options(row: dict) -> str:
    """A `smollm_step.py` row's memory options, as its table names them ("" for none)."""
    remat, chunks, groups = row.get("remat", "none"), row.get("head_chunks", 0), row.get("remat_groups", 0)
    return ", ".join(([] if remat == "none" else [f"remat {remat}"]) + ([f"head {chunks}"] if chunks else [])
                     + ([f"{groups} groups"] if groups else [])
                     + ([ALLOCATOR_LABELS[row["allocator"]]] if row.get("allocator", "glibc") != "glibc" else []))


def memory_rows(quick: bool, layers: int | None) -> list[dict]:
    """Each SmolLM2 step's memory on each base (`memory.py`): batch 4 x 128, or 1 x 32 when quick."""
    batch, seq = (1, 32) if quick else (4, 128)
    return [row for base in ("fp32", "bf16", "q4") for row in step_memory.rows(base, layers, batch, seq)]


def _plain_lora(job: list[str]) -> bool:
    """Whether a `smollm_step.py` job trains LoRA adapters (not DoRA, not full fine-tuning)."""
    return "--targets" in job and "--dora" not in job


def smollm_runs(quick: bool, rounds: int, dora: bool = True, bf16: bool = False, huge_pages: bool = False,
                layers: int | None = None) -> list[dict]:
    """Each framework in a fresh process: lorax and PEFT, LoRA on q,v and all-linear and DoRA on
    q,v; full FT for scale; with ``bf16``, LoRA again over a bf16 base, and lorax's also with the
    memory options (`MEMORY_OPTIONS`); with ``huge_pages``, each framework's LoRA runs again with
    glibc's huge-page tunable. ``rounds`` runs of each, the frameworks alternating; each row is the
    run with the median time, and lists every run's time."""
    shape = ["--batch", "1", "--seq", "32", "--steps", "2", "--warmup", "1"] if quick else []
    shape += _layers(layers)
    jobs = [["lorax", "--targets", "qv"], ["peft", "--targets", "qv"]]
    if dora:
        jobs += [["lorax", "--targets", "qv", "--dora"], ["peft", "--targets", "qv", "--dora"]]
    if not quick:
        jobs += [["lorax", "--targets", "all-linear"], ["peft", "--targets", "all-linear"],
                 ["jax-full"], ["torch-full"]]
    if bf16:
        lora = [job for job in jobs if _plain_lora(job)]
        jobs += [[*job, "--base", "bf16"] for job in lora]
        jobs += [[*job, "--base", "bf16", *MEMORY_ARGV] for job in lora if job[0] == "lorax"]
    plain = [(job, False) for job in jobs]
    paged = [(job, True) for job in jobs if huge_pages and _plain_lora(job) and "--remat" not in job]
    runs: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for job, pages in plain + paged:
            runs.setdefault((*job, pages), []).append(
                smollm_step([*job, *shape], "glibc-huge-pages" if pages else "glibc"))
    return [median_run(results) for results in runs.values()]


def adapter_sizes(smollm: list[dict]) -> list[dict]:
    """Each adapter file against the GGUF checkpoint and the same weights in fp32."""
    from gguf import GGUFReader
    path = smollm.gguf_path()
    gguf, fp32 = path.stat().st_size, 4 * sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    return [dict(framework=r["framework"], kind=r["kind"], targets=r["targets"], adapter_bytes=r["adapter_bytes"],
                 over_gguf_q4=r["adapter_bytes"] / gguf, over_fp32_base=r["adapter_bytes"] / fp32,
                 gguf_bytes=gguf, fp32_base_bytes=fp32) for r in smollm if r["adapter_bytes"]]


def roofline_markdown(report: dict) -> list[str]:
    lines = [f"Machine: {report['machine']}.", "",
             "**Roofline**: plain matmul rate at the SmolLM2 projections' shapes ([512, in] x [in, out]), "
             "GFLOP/s, fp32 unless named (JAX bf16: bf16 operands accumulated in fp32)", "",
             "| framework | " + " | ".join(report["roofline"]["jax"]) + " |",
             "|---|" + "---|" * len(report["roofline"]["jax"])]
    lines += [f"| {k} | " + " | ".join(f"{r:.0f}" for r in v.values()) + " |"
              for k, v in report["roofline"].items() if v]
    return lines + ["", "Efficiency = matmul flops of the step (every layer counted) / its time / the framework's "
                    "peak above.", ""]


def smollm_markdown(report: dict) -> list[str]:
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"**{smollm.label(report['smollm'][0].get('layers'))} train step, lorax vs PEFT** (each in its own "
             "process, same batch, targets, "
             "rank, AdamW; base fp32, or bf16 with fp32 adapters; the run with the median time of those listed; "
             "the matmul peak is the framework's own in the base's dtype; first step: JAX's trace and compile "
             "included, what a notebook pays after each change)", "",
             "| framework | kind | targets | base | options | batch × seq | s / step | runs | tokens / s | "
             "trained params | peak RSS MiB | GFLOP | own matmul peak | efficiency | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['framework']} | {r['kind']} | {r['targets'] or 'all (full FT)'} | {r['base']} | "
              f"{_options(r) or '–'} | "
              f"{r['batch']} × {r['seq']} | "
              f"{r['s_per_step']:.2f} | {' '.join(f'{t:.2f}' for t in r.get('s_per_step_runs', []))} | "
              f"{r['tokens_per_s']:.0f} | {r['trained_params']:,} | "
              f"{f(r['train_peak_rss_mib'], '.0f')} | {r['step_gflop']:.0f} | {r['matmul_peak_gflops']:.0f} | "
              f"{r['efficiency']:.2f} | {f(r.get('first_step_s'), '.1f')} |" for r in report["smollm"]]
    by = {(r["framework"], r["kind"], r["targets"], r["base"], _options(r)): r for r in report["smollm"]}
    options = _options(MEMORY_OPTIONS)
    pairs = [((kind, targets, base, ""), (kind, targets, base, "")) for kind, targets in
             (("lora", "qv"), ("lora", "all-linear"), ("dora", "qv")) for base in ("fp32", "bf16")]
    pairs += [(("lora", targets, "bf16", options), ("lora", targets, "bf16", "")) for targets in ("qv", "all-linear")]
    pairs += [(("lora", targets, "bf16", ""), ("lora", targets, "fp32", "")) for targets in ("qv", "all-linear")]
    pairs += [(("lora", targets, base, "huge pages"), ("lora", targets, base, peft)) for targets in ("qv", "all-linear")
              for base in ("fp32", "bf16") for peft in ("huge pages", "")]
    for ours, theirs in pairs:
        if ("lorax", *ours) in by and ("peft", *theirs) in by:
            a, b = by[("lorax", *ours)], by[("peft", *theirs)]
            rss = None if None in (a["train_peak_rss_mib"], b["train_peak_rss_mib"]) else \
                a["train_peak_rss_mib"] / b["train_peak_rss_mib"]
            bases = ours[2] if ours[2] == theirs[2] else f"lorax {ours[2]} against PEFT {theirs[2]}"
            bases += f"; lorax with {ours[3]}" if ours[3] else ""
            if ours[3] == "huge pages":
                bases += f", PEFT {'with' if theirs[3] else 'without'} them"
            lines.append(f"\nlorax / PEFT, {ours[0]} {ours[1]} ({bases}): time "
                         f"{a['s_per_step'] / b['s_per_step']:.3f}, peak RSS {f(rss, '.3f')}")
    if ("jax-full", "full", None, "fp32", "") in by:
        full = by[("jax-full", "full", None, "fp32", "")]["efficiency"]
        for targets in ("qv", "all-linear"):
            if ("lorax", "lora", targets, "fp32", "") in by:
                lines.append(f"\nlorax LoRA {targets} efficiency / JAX full fine-tuning's (fp32): "
                             f"{by[('lorax', 'lora', targets, 'fp32', '')]['efficiency'] / full:.3f}")
    return lines


def markdown(report: dict) -> str:
    peak = {k: v and v["peak"] for k, v in report["roofline"].items()}
    lines = roofline_markdown(report) + [f"GPT widths {report['widths']}, Adam, fp32, r=8 unless stated.", "",
             "**Compiled train step** (matmul flops counted from the jaxpr, every layer; XLA's memory analysis)",
             "",
             "| variant | GFLOPs | flops / full | step MiB | memory / full |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['gflops']:.2f} | {r['flops_over_full']:.3f} | {r['step_mib']:.0f} | "
              f"{r['memory_over_full']:.3f} |" for r in report["compiled"]]
    lines += ["", f"**Wall time per train step** (median of {report['repeats']}, interleaved in one process)", "",
              "| variant | s / step | tokens / s | time / full | GFLOP | GFLOP/s | efficiency |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['time_over_full']:.3f} | "
              f"{r['gflop']:.1f} | {r['gflops_per_s']:.0f} | {r['gflops_per_s'] / peak['jax']:.2f} |"
              for r in report["wall"]]
    wall = {r["variant"]: r for r in report["wall"]}
    lines.append(f"\nDoRA / LoRA, all-linear step time: "
                 f"{wall[DORA]['s_per_step'] / wall['LoRA all-linear']['s_per_step']:.3f}")
    lines += ["", f"**Adapter kinds** (all-linear, r=8, alpha 16; LoKr and LoHa as PEFT's defaults, OFT blocks "
              f"of 32; wall time "
              f"median of {report['repeats']}, interleaved)", "",
              "| kind | trainable | / LoRA | GFLOPs | flops / LoRA | temporaries MiB | / LoRA | s / step | "
              "time / LoRA |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['trainable']:,} | {r['trainable_over_lora']:.3f} | {r['gflops']:.2f} | "
              f"{r['flops_over_lora']:.3f} | {r['temp_mib']:.0f} | {r['temp_over_lora']:.3f} | "
              f"{r['s_per_step']:.3f} | {r['time_over_lora']:.3f} |" for r in report["kinds"]]
    lines += ["", "**Inference** (forward, all-linear adapters)", "",
              "| variant | ms / call | time / base | flops / base |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {1e3 * r['s_per_call']:.1f} | {r['time_over_base']:.3f} | "
              f"{r['flops_over_base']:.4f} |" for r in report["inference"]]
    lines += ["", "**Where the unmerged forward's time goes** (forward against the base, same batch)", "",
              "| variant | ms / call | time / base | flops / base |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {1e3 * r['s_per_call']:.1f} | {r['time_over_base']:.3f} | "
              f"{r['flops_over_base']:.4f} |" for r in report["overhead"]]
    lines += ["", "**Serving 8 adapters** (all-linear r=8; a batch of 8 examples, example i with adapter i)", "",
              "| variant | ms | tokens / s | mixed batch's throughput / this |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {1e3 * r['s_per_call']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['mixed_throughput_over_this']:.3f} |" for r in report["serving"]]
    lines += ["", *smollm_markdown(report)]
    lines += ["", "**Adapter file** (PEFT `adapter_model.safetensors`) against the base checkpoint", "",
              "| framework | kind | targets | adapter MiB | / GGUF Q4_1 file | / fp32 weights |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['framework']} | {r['kind']} | {r['targets']} | {r['adapter_bytes'] / 2**20:.2f} | "
              f"{r['over_gguf_q4']:.4f} | "
              f"{r['over_fp32_base']:.4f} |" for r in report["adapters"]]
    lines += ["", decode.markdown(report["decode"]), "", step_memory.markdown(report["memory"])]
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
    parser.add_argument("--smoke", action="store_true",
                        help="--quick at each section's smallest configuration (one rank, one sequence length, "
                             "SmolLM2's first 2 layers): the test suite's run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--rounds", type=int, help="SmolLM2 runs per variant, frameworks alternating (2; quick: 1)")
    parser.add_argument("--only", choices=("qlora", "smollm"), help="run one section alone")
    parser.add_argument("--smollm-layers", type=int, dest="layers",
                        help="SmolLM2 runs keep the first N decoder layers (a smoke run); all 30 by default")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.layers = True, args.layers or 2
    widths = QUICK if args.quick else gpt.GPT2_SMALL
    repeats, warmup = (3, 1) if args.quick else (20, 2)
    if args.only == "qlora":
        return qlora_main(args, widths, repeats, warmup)
    if args.only == "smollm":
        return smollm_main(args)
    ranks, seqs = ((1, 8), (16, 32)) if args.quick else ((1, 4, 8, 16, 64), (32, 64, 128, 256))
    if args.smoke:
        ranks, seqs = (1,), (widths["seq"],)

    report = dict(machine=machine(), widths=widths, repeats=repeats)
    print("roofline (plain matmul rates) ...", flush=True)
    report["roofline"] = roofline_rates()
    print("compiled costs ...", flush=True)
    report["compiled"] = compiled_table(widths)
    print("wall time ...", flush=True)
    report["wall"], measured = wall_table(widths, repeats, warmup)
    print("adapter kinds ...", flush=True)
    report["kinds"] = kinds_table(widths, repeats, warmup)
    print("rank sweep ...", flush=True)
    report["ranks"] = rank_sweep(widths, ranks, repeats, warmup)
    print("sequence sweep ...", flush=True)
    report["seqs"] = seq_sweep(widths, seqs, repeats, warmup, measured)
    print("inference ...", flush=True)
    report["inference"] = inference_table(widths, repeats, warmup)
    print("unmerged overhead ...", flush=True)
    report["overhead"] = overhead_table(widths, repeats, warmup)
    print("serving 8 adapters ...", flush=True)
    report["serving"] = serving_table(widths, repeats, warmup)
    print("SmolLM2-135M, one process per framework ...", flush=True)
    report["smollm"] = smollm_runs(args.quick, args.rounds or (1 if args.quick else 2), layers=args.layers)
    report["adapters"] = [] if args.layers else adapter_sizes(report["smollm"])  # against the whole file
    print("QLoRA ...", flush=True)
    report["qlora"] = qlora_table(widths, repeats, warmup)
    report["smollm_qlora"] = smollm_qlora_runs(args.quick, args.layers, report["smollm"])
    print("SmolLM2-135M decode, one process per runtime ...", flush=True)
    report["decode"] = decode.runs(args.quick, layers=args.layers)
    print("SmolLM2-135M train-step memory ...", flush=True)
    report["memory"] = memory_rows(args.quick, args.layers)

    written(args.out, "benchmark", report, markdown(report) + "\n\n" + qlora_markdown(report))
    chart(report, args.out / "performance.png")
    print(f"wrote {args.out}/performance.png")
    return report


def smollm_main(args) -> dict:
    """The roofline and the SmolLM2 lorax-vs-PEFT steps alone, to results/smollm.*."""
    report = dict(machine=machine(), roofline=roofline_rates(("fp32", "bf16")))
    report["smollm"] = smollm_runs(args.quick, args.rounds or (1 if args.quick else 2), dora=False, bf16=True,
                                   huge_pages=True, layers=args.layers)
    table = "\n".join(roofline_markdown(report) + smollm_markdown(report))
    return written(args.out, "smollm", report, table)


def qlora_main(args, widths: dict, repeats: int, warmup: int) -> dict:
    report = dict(machine=machine(), widths=widths, repeats=repeats)
    print("QLoRA on the GPT ...", flush=True)
    report["qlora"] = qlora_table(widths, repeats, warmup)
    print("SmolLM2-135M, fp32 and Q4_1 bases ...", flush=True)
    report["smollm_qlora"] = smollm_qlora_runs(args.quick, args.layers)
    table = qlora_markdown(report)
    return written(args.out, "qlora", report, table)


if __name__ == "__main__":
    main()
