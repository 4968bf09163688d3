"""Wall time of compiled programs, measured side by side in one process.

Variants run interleaved (one step of each in turn), so drift of the machine — on this
2-core CPU about 10% between runs — falls on all of them alike; each reports the median
of ``repeats`` timed calls after ``warmup`` untimed ones, and ratios between variants are
medians of the ratios within each round.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
from lorax_examples.flops import matmul_flops


@dataclasses.dataclass(frozen=True)
class Timing:
    times: tuple[float, ...]  # seconds of each timed call, one per round
    flops: float  # matmul flops of the program that was timed, every scan iteration counted
    temp_bytes: int = 0  # XLA's temporaries of the program that was timed (train steps: donated)

    @property
    def seconds(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)

    def over(self, reference: Timing) -> float:
        """Median of the per-round ratios: a round's drift divides out."""
        return statistics.median(t / r for t, r in zip(self.times, reference.times))


def _runner(fn: Callable, args: tuple, stateful: bool):
    """``(call, compiled)``; stateful train steps donate and get back (trained, opt_state)."""
    if not stateful:
        compiled = jax.jit(fn).lower(*args).compile()
        return (lambda: jax.block_until_ready(compiled(*args))), compiled
    args = list(jax.tree.map(lambda x: x.copy(), args[:2])) + list(args[2:])
    compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()

    def run():
        trained, opt, loss = compiled(*args)
        args[0], args[1] = trained, opt
        jax.block_until_ready(loss)

    return run, compiled


def interleaved(programs: dict[str, tuple[Callable, tuple]], *, repeats: int = 12, warmup: int = 2,
                stateful: bool = True) -> dict[str, Timing]:
    """Median seconds per call of each program, timed in turns, with its matmul flops (every
    layer of a scan counted: `flops.matmul_flops`)."""
    flops = {name: float(matmul_flops(fn, *args)) for name, (fn, args) in programs.items()}  # before donation
    built = {name: _runner(fn, args, stateful) for name, (fn, args) in programs.items()}
    times = rounds({name: run for name, (run, _) in built.items()}, repeats=repeats, warmup=warmup)
    return {name: Timing(t, flops[name], built[name][1].memory_analysis().temp_size_in_bytes)
            for name, t in times.items()}


def rounds(runs: dict[str, Callable[[], object]], *, repeats: int, warmup: int) -> dict[str, tuple[float, ...]]:
    """Seconds of each of ``repeats`` calls of every ``run()``, taken in turns after ``warmup``
    untimed calls of each (a run blocks until its results are ready)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: tuple(t) for name, t in times.items()}
