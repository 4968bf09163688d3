"""Resumable training: kill -9 or SIGTERM a run, restart it, and get the uninterrupted losses bit for bit."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import lorax

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "resumable_train.py"
ARGS = ["--steps", "24", "--save-every", "5"]


def run(out, *extra, timeout=240):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def losses(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run(out)
    return losses(out)


def interrupt(out, sig, after_lines):
    """Start a slow run, send ``sig`` once it has logged ``after_lines`` losses; return its exit code and output."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, "--sleep", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 180
        while not (out / "losses.jsonl").exists() or len(losses(out)) < after_lines:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return proc.returncode, stdout, stderr


def test_kill_9_between_saves_then_resume_gives_the_same_losses(tmp_path, reference):
    code, _, _ = interrupt(tmp_path, signal.SIGKILL, after_lines=12)
    assert code == -signal.SIGKILL
    written = len(losses(tmp_path))
    assert 12 <= written < 24  # it really died mid-run, with losses logged past its last save
    resumed = int(re.search(r"resumed at step (\d+)", run(tmp_path, "--resume")).group(1))
    assert resumed % 5 == 0 and 10 <= resumed <= written  # the latest complete save, never a partial one
    assert losses(tmp_path) == reference  # bit for bit: floats compared exactly


def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(tmp_path, reference):
    code, stdout, stderr = interrupt(tmp_path, signal.SIGTERM, after_lines=7)
    assert code == 0, stderr[-3000:]
    stopped = len(losses(tmp_path))
    assert f"preempted: saved step {stopped}, exiting" in stdout and 7 <= stopped < 24
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())[-1] == stopped
    assert f"resumed at step {stopped}" in run(tmp_path, "--resume")
    assert losses(tmp_path) == reference


def test_state_template_mismatch_and_missing_state_are_clear_errors(tmp_path):
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    base = {"w": jnp.ones((4, 3))}
    lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    lorax.save(tmp_path, lp)
    with pytest.raises(ValueError, match="holds no training state"):
        lorax.load(tmp_path, base, state={"step": 0})
    lorax.save(tmp_path, lp, state={"step": 3, "m": jnp.zeros(2)})
    with pytest.raises(ValueError, match="does not match the template given"):
        lorax.load(tmp_path, base, state={"step": 0, "m": jnp.zeros(5)})
    with pytest.raises(TypeError, match=r"state\['key'\] is a typed PRNG key; pass jax.random.key_data"):
        lorax.save(tmp_path, lp, state={"key": jax.random.key(0)})
    with pytest.raises(TypeError, match=r"state\['name'\] is str"):
        lorax.save(tmp_path, lp, state={"name": "run"})
