"""How the whole suite runs: which tests are integration tests, how xdist shares them out, and
one JAX compilation cache for the run.

- Everything under ``tests/integration/`` and ``notebooks/`` is marked ``integration``; the unit
  loop is ``pytest -m "not integration"``.
- ``pytest -n auto --dist loadgroup`` (the project's default options) sends each integration
  module to one worker as a whole (its module fixtures load a model or run a command once), and
  the rest test by test. Integration modules go first, heaviest first, so no worker is left
  with a long module at the end.
- The first pytest process makes a temporary JAX compilation cache that every worker and every
  subprocess they start inherits through ``JAX_COMPILATION_CACHE_DIR``: a program compiled once
  (the same reference forward in many tests, an example script run twice, a resumed run) is not
  compiled again, however quickly it compiled (about 1.2x faster on the unit loop). The unit
  loop keeps its cache in ``.cache/jax-unit-loop`` from one run to the next, so a run after an
  edit compiles only the programs the edit changed. A cache the caller set is kept as it is.
- SmolLM2's GGUF file is read once for the run: ``LORAX_EXAMPLES_CACHE``, a temporary folder
  every worker and subprocess inherits, keeps its parsed metadata and transformers' conversion
  (`lorax_examples.smollm`), which otherwise cost every process that loads the model 4-10 s.
- Tests check numbers, not speed, on programs that mostly run in milliseconds and compile in
  tens of them: pytest's processes turn XLA:CPU's LLVM optimisations off (``XLA_FLAGS``), about
  1.4x faster; processes started with `helpers.subprocess_env` (the examples, the benchmarks)
  get the caller's flags, other children inherit the fast ones. The unit loop
  (``-m "not integration"``) also draws a third of each property test's examples
  (``LORAX_UNIT_LOOP``); the full run draws them all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
INTEGRATION = (ROOT / "tests" / "integration", ROOT / "notebooks")
# integration modules by cost (the slowest first); any other goes after these, in file order
HEAVIEST = ("test_benchmarks", "test_smollm", "test_docs", "test_resume_smollm", "test_resume", "test_multihost",
            "test_sharding", "test_paper_tables", "test_peft", "test_checkpoint_processes", "test_minilm",
            "test_multi_peft", "test_llamacpp")


UNIT_LOOP_CACHE = ROOT / ".cache" / "jax-unit-loop"  # git-ignored; delete it to start cold
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return  # a worker inherits the controller's environment
    os.environ["LORAX_CALLER_XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")  # for the processes tests start
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    if config.getoption("markexpr", "").replace(" ", "") == "notintegration":
        os.environ["LORAX_UNIT_LOOP"] = "1"  # property tests draw fewer examples (`helpers.examples`)
    if not os.environ.get("LORAX_EXAMPLES_CACHE"):  # SmolLM2's file read once for the run (`lorax_examples.smollm`)
        examples_cache = tempfile.mkdtemp(prefix="lorax-examples-cache-")
        os.environ["LORAX_EXAMPLES_CACHE"] = examples_cache
        config.add_cleanup(lambda: shutil.rmtree(examples_cache, ignore_errors=True))
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # a cache chosen by the caller
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs recur across tests
    if os.environ.get("LORAX_UNIT_LOOP") == "1":  # the edit-test loop keeps its cache from one run to the next
        UNIT_LOOP_CACHE.mkdir(parents=True, exist_ok=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(UNIT_LOOP_CACHE)
        return
    cache = tempfile.mkdtemp(prefix="lorax-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


def _integration_module(item: pytest.Item) -> str | None:
    path = Path(str(item.path))
    return path.stem if any(path.is_relative_to(root) for root in INTEGRATION) else None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = _integration_module(item)
        if module is not None:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.xdist_group(module))

    def rank(indexed: tuple[int, pytest.Item]) -> tuple[int, int]:
        position, item = indexed
        module = _integration_module(item)
        if module is None:
            return (len(HEAVIEST) + 1, position)
        return (HEAVIEST.index(module) if module in HEAVIEST else len(HEAVIEST), position)

    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]
