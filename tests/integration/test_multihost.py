"""Multi-host on one machine: two local processes x 4 CPU devices (``jax.distributed`` over gloo).

Checkpoints of host-local, NumPy-based and global leaves save and load on two processes, and
the sharded fine-tuning example trained by two "hosts" gives the losses of one 8-device process."""

import re
import socket
import subprocess
import sys

import numpy as np
from helpers import ROOT, finish, lock_held_by_another_process, subprocess_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands, timeout=480):
    """Run the commands at once; every child is killed on the way out. Returns their stdouts."""
    return finish([subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=subprocess_env()) for c in commands], timeout)


def test_two_processes_save_and_load_host_local_numpy_and_global_leaves(tmp_path):
    port, worker = free_port(), str(ROOT / "tests" / "integration" / "multihost_worker.py")
    outs = run_all([[sys.executable, worker, str(port), str(i), "2", str(tmp_path)] for i in range(2)])
    assert [o.strip().splitlines()[-1] for o in outs] == ["process 0: ok", "process 1: ok"]
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [".lorax.lock", "0"]


def test_a_locked_folder_is_refused_on_every_process_without_a_hang(tmp_path):
    with lock_held_by_another_process(tmp_path):
        port, worker = free_port(), str(ROOT / "tests" / "integration" / "multihost_worker.py")
        outs = run_all([[sys.executable, worker, str(port), str(i), "2", str(tmp_path), "locked"] for i in range(2)])
    assert [o.strip().splitlines()[-1] for o in outs] == ["process 0: refused", "process 1: refused"]
    assert [p.name for p in tmp_path.iterdir()] == [".lorax.lock"]


def test_a_run_saved_on_two_processes_resumes_there_like_the_uninterrupted_run(tmp_path):
    port, worker = free_port(), str(ROOT / "tests" / "integration" / "multihost_worker.py")
    outs = run_all([[sys.executable, worker, str(port), str(i), "2", str(tmp_path), "resume"] for i in range(2)])
    assert [o.strip().splitlines()[-1] for o in outs] == ["process 0: resumed ok", "process 1: resumed ok"]


def losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]


def test_two_hosts_of_four_devices_train_like_one_process_of_eight(tmp_path):
    script, port = str(ROOT / "examples" / "sharded_finetune.py"), free_port()
    common = [sys.executable, script, "--steps", "12"]
    one, host0, host1 = run_all([
        [*common, "--cpu-devices", "8", "--out", str(tmp_path / "one")],
        *[[*common, "--cpu-devices", "4", "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2", "--process-id", str(i), "--out", str(tmp_path / "two")] for i in range(2)]])
    # gloo's own chatter, whose lines other processes' output can split: "[Gloo] Rank 1 is connected to 1 peer ranks..."
    quiet = [line for line in host1.splitlines() if line.strip() and not re.search(r"\[Gloo\]|peer ranks", line)]
    assert "over 8 cpu devices in 2 processes" in host0 and quiet == []  # process 0 alone logs
    assert len(losses(one)) == 7 and losses(one)[-1] < losses(one)[0]
    np.testing.assert_allclose(losses(host0), losses(one), rtol=1e-5)  # all-reduce order differs across hosts
    assert (tmp_path / "two" / "12" / "state").is_dir()  # saved as the step it reached
