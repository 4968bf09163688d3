"""Each framework's SmolLM2-135M LoRA step under each allocator: glibc's malloc, glibc with its
huge-page tunable, and tcmalloc where it is installed; s / step and peak RSS, lorax against PEFT.

Run from the repository root, the examples' package on the path:
PYTHONPATH=examples python benchmarks/allocators.py ...

    python benchmarks/allocators.py                 # q,v and all-linear, fp32 and bf16, one round
    python benchmarks/allocators.py --rounds 2      # the allocators alternating, twice
    python benchmarks/allocators.py --bases bf16    # the bf16 base alone
    python benchmarks/allocators.py --layers 2 --steps 2   # a smoke run

XLA:CPU allocates a compiled step's temporaries as one block per call; glibc maps such a block
fresh and unmaps it afterwards, so each step faults in its pages again. torch allocates many
smaller blocks. How much each allocator changes, for each framework, is what this measures
(`processes.examples_env` names the environments). Every run is `smollm_step.py` in a fresh
process; within a round the allocators alternate for each framework. Each row is the run with the
median time. Writes results/allocators.json and results/allocators.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import processes
import roofline
from report_files import written

HERE = Path(__file__).resolve().parent
CONFIGS = (("qv", "fp32"), ("all-linear", "fp32"), ("qv", "bf16"), ("all-linear", "bf16"))
FRAMEWORKS = ("lorax", "peft")
BASES = ("fp32", "bf16")


def available() -> tuple[str, ...]:
    """`processes.ALLOCATORS` this machine can run (tcmalloc only where it is installed)."""
    return tuple(a for a in processes.ALLOCATORS if a != "tcmalloc" or processes.tcmalloc_library())


def runs(rounds: int, shape: list[str], allocators: tuple[str, ...], bases=BASES) -> list[dict]:
    """One row per framework, configuration on one of ``bases`` and allocator: the run with the
    median time of ``rounds``, with every run's time."""
    results: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for targets, base in (c for c in CONFIGS if c[1] in bases):
            for framework in FRAMEWORKS:
                for allocator in allocators:
                    argv = [framework, "--targets", targets, "--base", base, *shape]
                    row = processes.smollm_step(argv, allocator)
                    results.setdefault((framework, targets, base, allocator), []).append(row)
    return [processes.median_run(done) for done in results.values()]


def markdown(report: dict) -> str:
    by = {(r["framework"], r["targets"], r["base"], r["allocator"]): r for r in report["rows"]}
    allocators = [a for a in processes.ALLOCATORS if any(r["allocator"] == a for r in report["rows"])]
    lines = [f"Machine: {report['machine']}; transparent huge pages: {report['transparent_huge_pages']}.", "",
             "**SmolLM2-135M LoRA train step by allocator** (each run in its own process; s / step, the median "
             "run's, and its training peak RSS)", "",
             "| targets | base | framework | " + " | ".join(allocators) + " |",
             "|---|---|---|" + "---|" * len(allocators)]
    for targets, base in CONFIGS:
        for framework in FRAMEWORKS:
            cells = [by.get((framework, targets, base, a)) for a in allocators]
            if not any(cells):
                continue
            lines.append(f"| {targets} | {base} | {framework} | " + " | ".join(
                "–" if r is None else f"{r['s_per_step']:.3f} s, {r['train_peak_rss_mib']:.0f} MiB" for r in cells)
                + " |")
    lines += ["", "**lorax / PEFT, time**: under the same allocator, and each framework under its fastest", "",
              "| targets | base | " + " | ".join(allocators) + " | each at its fastest |",
              "|---|---|" + "---|" * (len(allocators) + 1)]
    for targets, base in CONFIGS:
        times = {f: {a: by[(f, targets, base, a)]["s_per_step"] for a in allocators if (f, targets, base, a) in by}
                 for f in FRAMEWORKS}
        if not all(times.values()):
            continue
        same = [f"{times['lorax'][a] / times['peft'][a]:.2f}" if a in times["lorax"] and a in times["peft"]
                else "–" for a in allocators]
        best = {f: min(t, key=t.get) for f, t in times.items()}
        lines.append(f"| {targets} | {base} | " + " | ".join(same) + f" | "
                     f"{times['lorax'][best['lorax']] / times['peft'][best['peft']]:.2f} "
                     f"(lorax {best['lorax']}, PEFT {best['peft']}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (median reported)")
    p.add_argument("--layers", type=int, help="keep the first N decoder layers (a smoke run); all 30 by default")
    p.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES), help="the bases measured")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds and --steps must be at least 1, not {args.rounds} and {args.steps}")
    shape = ["--steps", str(args.steps), *([] if args.layers is None else ["--layers", str(args.layers)])]
    allocators = available()
    report = dict(machine=f"{roofline.describe(roofline.machine())}", allocators=allocators,
                  transparent_huge_pages=processes.transparent_huge_pages(), rounds=args.rounds)
    report["rows"] = runs(args.rounds, shape, allocators, args.bases)
    return written(args.out, "allocators", report, markdown(report))


if __name__ == "__main__":
    main()
