"""Resumable training: kill -9 or SIGTERM a run, restart it, and get the uninterrupted losses bit for bit;
SIGTERM every process of a two-process run, restart them, and get the uninterrupted run's losses and adapters."""

import json
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, finish, subprocess_env
from test_multihost import free_port

import lorax

SCRIPT = ROOT / "examples" / "resumable_train.py"
ARGS = ["--steps", "24", "--save-every", "5"]


def run(out, *extra, timeout=240):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())
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
                            env=subprocess_env())
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


def start_hosts(out, *extra):
    """The two processes (two CPU devices each) of one multi-process run of the example."""
    port = free_port()
    return [subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, "--processes", "2",
                              "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}", "--cpu-devices", "2",
                              *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env()) for i in range(2)]


def trained_adapters(out):
    import resumable_train

    _, _, _, base = resumable_train.problem()
    trainable, _ = lorax.split(lorax.load(out / "ckpt", base))
    return [np.asarray(x) for x in jax.tree.leaves(trainable)]


def test_sigterm_to_every_process_of_a_multi_process_run_then_resume_gives_the_uninterrupted_run(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    procs = []
    try:
        procs = start_hosts(reference) + start_hosts(run, "--sleep", "0.3")  # the two runs side by side
        deadline = time.monotonic() + 180
        while not (run / "losses.jsonl").exists() or len(losses(run)) < 7:
            assert all(p.poll() is None for p in procs[2:]) and time.monotonic() < deadline, "the run ended early"
            time.sleep(0.05)
        for p in procs[2:]:
            p.send_signal(signal.SIGTERM)
        outs = finish(procs)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    stopped = len(losses(run))
    assert f"preempted: saved step {stopped}, exiting" in outs[2] and 7 <= stopped < 24
    assert "preempted" not in outs[3]  # process 0 alone prints
    assert sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit())[-1] == stopped
    resumed = finish(start_hosts(run, "--resume"))
    assert f"resumed at step {stopped}" in resumed[0]
    assert losses(run) == losses(reference) and len(losses(reference)) == 24
    for got, want in zip(trained_adapters(run), trained_adapters(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
