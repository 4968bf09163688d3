"""Checkpoints across processes: a process killed mid-save, two processes saving at once, a save into
a regular file, and sharded bases on fake CPU devices (restored sharding, the host's fingerprint)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
from helpers import QV_BASE as BASE
from helpers import adapted_gpt as _adapted
from helpers import subprocess_env

import lorax


def test_crash_mid_save_leaves_previous_step_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import os
        import jax, lorax
        from helpers import adapted_gpt as _adapted, with_random_b
        import orbax.checkpoint as ocp
        import numpy as np
        _, params, lp, _ = _adapted()
        lorax.save({str(tmp_path / 'run')!r}, lp, step=0)
        np.save({str(tmp_path / 'saved_b.npy')!r}, lp["params"]["h"]["fc"]["kernel"].b)  # as this process made it
        # die while step 1 is being written: after orbax starts, before it finalizes
        real = ocp.CheckpointManager.wait_until_finished
        ocp.CheckpointManager.wait_until_finished = lambda self: os._exit(17)
        lorax.save({str(tmp_path / 'run')!r}, with_random_b(lp, jax.random.key(9)), step=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 17, proc.stderr[-2000:]
    _, params, _, _ = _adapted()
    back = lorax.load(tmp_path / "run", params)
    np.testing.assert_array_equal(back["params"]["h"]["fc"]["kernel"].b, np.load(tmp_path / "saved_b.npy"))


def test_sharded_base_restores_factors_with_derived_sharding(tmp_path):
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np, lorax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        fn = lambda p, x: x @ p["w"]
        base = {{"w": jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data", "model")))}}
        lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 16)))
        lorax.save({str(tmp_path / 'c')!r}, lp)
        back = lorax.load({str(tmp_path / 'c')!r}, base)["w"]
        print(back.a.sharding.spec, back.b.sharding.spec)
        np.testing.assert_array_equal(back.a, lp["w"].a)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "P('data', None) P(None, 'model')"


def test_two_processes_saving_at_once_never_leave_a_broken_step(tmp_path):
    script = textwrap.dedent(f"""
        import lorax
        from helpers import qv_adapted as adapted
        ok = 0
        for i in range(3):
            try:
                lorax.save({str(tmp_path)!r}, adapted(i))
                ok += 1
            except RuntimeError as err:
                assert "another process is saving" in str(err), err
        print(ok)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=subprocess_env()) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    steps = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert len(steps) == sum(int(out) for out, _ in outs) >= 1
    for step in steps:
        lorax.load(tmp_path, BASE, step=step)  # every step is complete


def test_save_into_a_regular_file_fails_fast_and_exits(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    script = textwrap.dedent(f"""
        import lorax
        from helpers import qv_adapted as adapted
        try:
            lorax.save({str(target)!r}, adapted(0))
        except ValueError as err:
            print(err)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0 and "is a file, not a folder" in proc.stdout, proc.stderr[-2000:]
    assert target.read_text() == "not a folder"


def test_sharded_base_has_the_host_fingerprint(tmp_path):
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np, lorax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from lorax._src.io.records import fingerprint
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
        w = jax.random.normal(jax.random.key(0), (16, 8))
        sharded = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
        here, there = fingerprint(np.asarray(w)), fingerprint(sharded)
        assert here["sample"] == there["sample"], (here, there)
        assert abs(here["norm"] - there["norm"]) <= 1e-6 * here["norm"]
        fn = lambda p, x: x @ p["w"]
        lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2), fn, {{"w": sharded}}, jnp.ones((1, 16)))
        lorax.save({str(tmp_path)!r}, lp)
        lorax.load({str(tmp_path)!r}, {{"w": w}})
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
