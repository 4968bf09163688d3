"""The environment the benchmarks' child processes run in, and the SmolLM2 step run in one."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
ALLOCATORS = ("glibc", "glibc-huge-pages", "tcmalloc")
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: the blocks it maps itself get transparent huge pages
TCMALLOC = "tcmalloc_minimal"  # gperftools' (Debian: libtcmalloc-minimal4), preloaded
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def examples_env(allocator: str = "glibc") -> dict[str, str]:
    """This process's environment with ``examples/`` (the `lorax_examples` package) first on
    PYTHONPATH, and ``allocator`` serving the process's ``malloc``:

    - ``glibc``: the environment's own;
    - ``glibc-huge-pages``: glibc with its `HUGE_PAGES` tunable added to those set. XLA:CPU
      allocates a compiled program's temporaries as one block per call, which glibc maps fresh
      and unmaps afterwards, so every train step faults in each 4 KiB page of it again (about
      140,000 for the SmolLM2 step); with the tunable glibc asks for 2 MiB pages there;
    - ``tcmalloc``: gperftools' tcmalloc preloaded (`tcmalloc_library`), which keeps freed pages.

    >>> examples_env("glibc-huge-pages")["GLIBC_TUNABLES"].split(":")[-1]
    'glibc.malloc.hugetlb=1'
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator {allocator!r}: expected one of {ALLOCATORS}")
    paths = [str(EXAMPLES), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if allocator == "glibc-huge-pages" and HUGE_PAGES not in _tunables(env):
        env["GLIBC_TUNABLES"] = ":".join([*_tunables(env), HUGE_PAGES])
    elif allocator == "tcmalloc":
        library = tcmalloc_library()
        if library is None:
            raise FileNotFoundError(f"allocator 'tcmalloc': no lib{TCMALLOC} on this machine "
                                    "(Debian: apt-get install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = " ".join(filter(None, (env.get("LD_PRELOAD"), library)))
    return env


def _tunables(env: Mapping[str, str]) -> list[str]:
    return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def allocator(env: Mapping[str, str] = os.environ) -> str:
    """Which of `ALLOCATORS` ``env`` selects (`examples_env`'s inverse)."""
    if TCMALLOC in env.get("LD_PRELOAD", ""):
        return "tcmalloc"
    return "glibc-huge-pages" if HUGE_PAGES in _tunables(env) else "glibc"


def tcmalloc_library() -> str | None:
    """The name the dynamic loader finds tcmalloc by, or None where it is not installed."""
    return ctypes.util.find_library(TCMALLOC)


def transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``: glibc's
    tunable needs one of the first two), or None where the kernel does not say."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return None
    return next((word[1:-1] for word in setting.split() if word.startswith("[")), None)


def smollm_step(argv: list[str], allocator: str = "glibc") -> dict:
    """One `smollm_step.py` run in a fresh process under ``allocator`` (`examples_env`): its JSON
    row, with ``argv``."""
    print(f"  SmolLM2: {' '.join(argv)}{'' if allocator == 'glibc' else f' ({allocator})'} ...", flush=True)
    done = subprocess.run([sys.executable, str(HERE / "smollm_step.py"), *argv], capture_output=True, text=True,
                          env=examples_env(allocator))
    if done.returncode:
        raise SystemExit(f"smollm_step.py {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), argv=argv)


def median_run(runs: list[dict]) -> dict:
    """The run of ``runs`` (`smollm_step` rows) with the median time (the faster middle one of an
    even count), listing every run's time in order as ``s_per_step_runs``.

    >>> median_run([{"s_per_step": 2.0}, {"s_per_step": 1.0}])
    {'s_per_step': 1.0, 's_per_step_runs': [2.0, 1.0]}
    """
    ordered = sorted(runs, key=lambda r: r["s_per_step"])
    return dict(ordered[(len(ordered) - 1) // 2], s_per_step_runs=[r["s_per_step"] for r in runs])
