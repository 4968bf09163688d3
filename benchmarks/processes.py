"""The environment the benchmarks' child processes run in."""

from __future__ import annotations

import os
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def examples_env() -> dict[str, str]:
    """This process's environment with ``examples/`` (the `lorax_examples` package) first on PYTHONPATH."""
    paths = [str(EXAMPLES), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
