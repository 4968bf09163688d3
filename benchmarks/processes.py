"""The environment the benchmarks' child processes run in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: the blocks it maps itself get transparent huge pages
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def examples_env(huge_pages: bool = False) -> dict[str, str]:
    """This process's environment with ``examples/`` (the `lorax_examples` package) first on
    PYTHONPATH; with ``huge_pages``, glibc's `HUGE_PAGES` tunable added to those set.

    XLA:CPU allocates a compiled program's temporaries as one block per call, which glibc maps
    fresh and unmaps afterwards: every train step then faults in each 4 KiB page of it again
    (about 140,000 for the SmolLM2 step). With the tunable glibc asks for 2 MiB pages there.

    >>> "glibc.malloc.hugetlb=1" in examples_env(huge_pages=True)["GLIBC_TUNABLES"].split(":")
    True
    """
    paths = [str(EXAMPLES), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if huge_pages and not huge_pages_on(env):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), HUGE_PAGES)))
    return env


def huge_pages_on(env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``env`` sets glibc's `HUGE_PAGES` tunable."""
    return HUGE_PAGES in env.get("GLIBC_TUNABLES", "").split(":")


def transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``: the tunable
    needs one of the first two), or None where the kernel does not say."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return None
    return next((word[1:-1] for word in setting.split() if word.startswith("[")), None)
