"""Two settings of one JAX SmolLM2-135M train step, compiled in one process and timed in
alternating pairs: prints a table, writes JSON.

Run from the repository root, the examples' package on the path:
PYTHONPATH=examples python benchmarks/in_process_ab.py ...

    python benchmarks/in_process_ab.py lorax --targets qv --base bf16 --a=--attention-blocks=1 --b=--attention-blocks=4
    python benchmarks/in_process_ab.py lorax --base bf16 --a=--remat=none --b=--remat=full --pairs 12

Each setting is `smollm_step.py`'s arguments plus its own (``--a``, ``--b``). Separate processes
of one step differ by about 15% on a 2-core VM, which hides a change of a few percent; here both
steps share the process, its allocator and its state, and each pair runs them in turn (the
order alternating), so the ratio of each pair's two times measures the change. Writes
results/in_process_ab.json and .md (``--name`` changes the file name).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from pathlib import Path

import processes
import roofline
import smollm_step
from report_files import written

HERE = Path(__file__).resolve().parent


def timed_pairs(runs: dict, pairs: int) -> dict[str, list[float]]:
    """``pairs`` timed calls of each of ``runs`` (name -> a step that returns once done), in
    pairs whose order alternates; each name's times, in order.

    >>> times = timed_pairs({"a": lambda: None, "b": lambda: None}, 3)
    >>> [len(t) for t in times.values()]
    [3, 3]
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Every other argument is smollm_step.py's, common to both steps.")
    p.add_argument("--a", required=True, help="setting A: smollm_step.py arguments, as --a=--remat=none")
    p.add_argument("--b", required=True, help="setting B: the same, for the other step")
    p.add_argument("--pairs", type=int, default=24, help="timed pairs, after smollm_step.py's --warmup steps of each")
    p.add_argument("--name", default="in_process_ab", help="results file name")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args, common = p.parse_known_args(argv)
    step_args = {n: smollm_step.parsed(smollm_step.parser(p.description), common + shlex.split(extra))
                 for n, extra in (("A", args.a), ("B", args.b))}
    if any(a.framework not in ("lorax", "jax-full") for a in step_args.values()):
        p.error("both steps share one process: a JAX framework (lorax or jax-full)")
    if args.pairs < 1:
        p.error(f"--pairs takes a whole number from 1, got {args.pairs}")
    runs, first_losses = {}, {}
    for name, a in step_args.items():
        runs[name] = smollm_step.step_of(a)[0]
        first_losses[name] = [runs[name]() for _ in range(max(a.warmup, 1))]
    times = timed_pairs(runs, args.pairs)
    ratios = [b / a for a, b in zip(times["A"], times["B"])]
    settings = {"A": args.a, "B": args.b}
    report = dict(machine=roofline.describe(roofline.machine()), allocator=processes.allocator(),
                  common=common, settings=settings, pairs=args.pairs, first_losses=first_losses,
                  s_per_step={n: statistics.median(t) for n, t in times.items()}, times=times,
                  b_over_a_median=statistics.median(ratios),
                  b_over_a_quartiles=statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios)
    table = "\n".join([
        f"Machine: {report['machine']}; allocator: {report['allocator']}.", "",
        f"**In-process A/B**: `{' '.join(common)}`, {args.pairs} pairs, alternating", "",
        "| setting | arguments | s / step (median) | first loss |", "|---|---|---|---|",
        *(f"| {n} | `{settings[n]}` | {report['s_per_step'][n]:.4f} | {first_losses[n][0]:.5f} |" for n in settings),
        "", f"B / A, median of the pairs' ratios: **{report['b_over_a_median']:.3f}** "
            f"(quartiles {', '.join(f'{q:.3f}' for q in report['b_over_a_quartiles'])})"])
    written(args.out, args.name, report, table)


if __name__ == "__main__":
    main()
