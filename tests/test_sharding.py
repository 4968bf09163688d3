"""Runs tests/multidevice_checks.py on 8 fake CPU devices in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_multidevice_checks_pass_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "--rootdir", str(HERE), str(HERE / "multidevice_checks.py")],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_sharded_finetune_example_runs_on_8_cpu_devices():
    proc = subprocess.run([sys.executable, str(HERE.parent / "examples" / "sharded_finetune.py"),
                           "--cpu-devices", "8", "--steps", "12"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh: {'data': 2, 'model': 4} over 8 cpu devices" in out
    assert "q_proj: w P(None, None, 'model')  a P(None, None, None)  b P(None, None, 'model')" in out
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]
    assert losses[-1] < losses[0]
