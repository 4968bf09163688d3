"""Adapter checkpoints: exact round trip, refusal of a wrong base, crash safety, retention."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, make_case, subprocess_env, with_random_b

import lorax

ROOT = Path(__file__).resolve().parents[1]


def _adapted():
    fn, params, x = make_case("gpt")
    config = lorax.LoraConfig(rank=2, alpha=6.0, trainable=r".*ln_f.*|.*LayerNorm_0/scale")
    return fn, params, with_random_b(lorax.init(KEY, config, fn, params, x)), x


def test_round_trip_is_exact_and_writes_only_adapters(tmp_path):
    fn, params, lp, x = _adapted()
    folder = lorax.save(tmp_path / "ckpt", lp, step=7, config=lorax.LoraConfig(rank=2, use_rslora=True))
    record = json.loads((folder / "meta" / "metadata").read_text())
    assert record["config"]["use_rslora"] is True and record["config"]["targets"] == "all-linear"
    entry = next(e for e in record["weights"] if e["path"] == "params/h/out/kernel")
    assert (entry["a_axes"], entry["b_axes"], entry["stack_axes"], entry["scale"]) == ([1, 2], [3], [0], 3.0)
    back = lorax.load(tmp_path / "ckpt", params)
    assert jax.tree.structure(back, is_leaf=lambda n: isinstance(n, lorax.LoraWeight)) == \
        jax.tree.structure(lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lorax.lora(fn)(back, x), lorax.lora(fn)(lp, x))
    written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    base_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
    adapter_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(lorax.split(lp)[0]))
    assert written < adapter_bytes + 0.5 * base_bytes  # the frozen base is not in it


def test_wrong_base_is_refused_listing_every_mismatch(tmp_path):
    _, params, lp, _ = _adapted()
    lorax.save(tmp_path / "ckpt", lp)
    other = jax.tree.map(lambda x: x, params)
    h = other["params"]["h"]
    h["query"]["kernel"] = h["query"]["kernel"][:, :16]
    h["value"]["kernel"] = h["value"]["kernel"].astype(jnp.bfloat16)
    del h["key"]
    with pytest.raises(ValueError) as err:
        lorax.load(tmp_path / "ckpt", other)
    msg = str(err.value)
    assert "params/h/key/kernel: not in the base" in msg
    assert "params/h/query/kernel: base has (2, 16, 4, 8) float32, the adapter was saved for (2, 32, 4, 8)" in msg
    assert "params/h/value/kernel: base has (2, 32, 4, 8) bfloat16" in msg


def test_retention_keeps_newest_steps_and_load_takes_latest(tmp_path):
    _, params, lp, _ = _adapted()
    for step in range(4):
        lorax.save(tmp_path / "run", with_random_b(lp, jax.random.key(step)), step=step, keep=2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["2", "3"]
    latest = lorax.load(tmp_path / "run", params)
    expected = with_random_b(lp, jax.random.key(3))
    np.testing.assert_array_equal(latest["params"]["h"]["fc"]["kernel"].b,
                                  expected["params"]["h"]["fc"]["kernel"].b)


def test_crash_mid_save_leaves_previous_step_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import os
        import jax, lorax
        from helpers import with_random_b
        from test_checkpoint import _adapted
        import orbax.checkpoint as ocp
        _, params, lp, _ = _adapted()
        lorax.save({str(tmp_path / 'run')!r}, lp, step=0)
        # die while step 1 is being written: after orbax starts, before it finalizes
        real = ocp.CheckpointManager.wait_until_finished
        ocp.CheckpointManager.wait_until_finished = lambda self: os._exit(17)
        lorax.save({str(tmp_path / 'run')!r}, with_random_b(lp, jax.random.key(9)), step=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 17, proc.stderr[-2000:]
    _, params, lp, _ = _adapted()
    back = lorax.load(tmp_path / "run", params)
    np.testing.assert_array_equal(back["params"]["h"]["fc"]["kernel"].b, lp["params"]["h"]["fc"]["kernel"].b)


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
