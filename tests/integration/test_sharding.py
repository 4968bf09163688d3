"""Runs multidevice_checks.py and the sharded fine-tuning example on 8 fake CPU devices in subprocesses."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, subprocess_env

import lorax

HERE = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "sharded_finetune.py"


def test_multidevice_checks_pass_on_8_cpu_devices():
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-n", "0",
                           "--rootdir", str(HERE), str(HERE / "multidevice_checks.py")],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def finetune(*args: str) -> str:
    """The sharded fine-tuning example's output on 8 CPU devices."""
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--cpu-devices", "8", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def logged_losses(out: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"step +(\d+)  loss ([0-9.]+)", out)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, finetune("--steps", "12", "--out", str(folder))


def test_sharded_finetune_example_runs_on_8_cpu_devices(uninterrupted):
    folder, out = uninterrupted
    assert "mesh: {'data': 2, 'model': 4} over 8 cpu devices" in out
    assert "q_proj: w P(None, None, 'model')  a P(None, None, None)  b P(None, None, 'model')" in out
    losses = list(logged_losses(out).values())
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["12"]


def saved_adapters(folder: Path) -> list[np.ndarray]:
    import sharded_finetune
    from lorax_examples.llama import Llama

    base = Llama(sharded_finetune.llama_config(32)).init(jax.random.key(0), jnp.zeros((8, 32), jnp.int32))
    return [np.asarray(x) for x in jax.tree.leaves(lorax.split(lorax.load(folder, base))[0])]


def test_sharded_finetune_resumed_on_the_mesh_ends_like_the_uninterrupted_run(uninterrupted, tmp_path):
    folder, out = uninterrupted
    finetune("--steps", "6", "--save-every", "3", "--out", str(tmp_path))
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 6]
    resumed = finetune("--steps", "12", "--out", str(tmp_path), "--resume")
    assert "resumed at step 6" in resumed
    expected = {step: loss for step, loss in logged_losses(out).items() if step >= 6}
    assert logged_losses(resumed) == expected and list(expected) == [6, 8, 10, 11]
    for got, want in zip(saved_adapters(tmp_path), saved_adapters(folder), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sharded_finetune_resume_without_out_is_refused():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--resume"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--resume needs --out" in proc.stderr
