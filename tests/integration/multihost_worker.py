"""One process of a local multi-process JAX run (``jax.distributed`` over gloo on CPU), for test_multihost.py.

    python tests/integration/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES FOLDER [save-load|locked|resume]
"""

from __future__ import annotations

import dataclasses
import os
import sys


def main(port: int, process_id: int, num_processes: int, folder: str, mode: str = "save-load") -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lorax

    fn = lambda p, x: x @ p["w"] + p["bias"]  # noqa: E731
    x = np.ones((1, 8), np.float32)
    config = lorax.LoraConfig(rank=2, trainable="bias")
    if mode == "locked":  # another process holds the folder's lock: every process raises, none hangs
        base = {"w": np.ones((8, 4), np.float32), "bias": np.zeros(4, np.float32)}
        try:
            lorax.save(folder, lorax.init(jax.random.key(0), config, fn, base, x))
        except RuntimeError as err:
            assert "another process saving" in str(err) or "another process is saving" in str(err), err
            print(f"process {jax.process_index()}: refused", flush=True)
        return

    if mode == "resume":
        resume_on_the_global_mesh(folder)
        return

    # 1. host-local adapters over a NumPy base: each process holds the whole (identical) value
    base = {"w": np.ones((8, 4), np.float32), "bias": np.zeros(4, np.float32)}
    lp = lorax.init(jax.random.key(0), config, fn, base, x)
    lp["w"] = dataclasses.replace(lp["w"], b=jnp.full(lp["w"].b.shape, 0.5, lp["w"].b.dtype))
    lorax.save(f"{folder}/local", lp, state={"step": 3, "m": np.arange(3.0)})
    back, state = lorax.load(f"{folder}/local", base, state={"step": 0, "m": np.zeros(3)})
    assert state["step"] == 3 and np.array_equal(state["m"], np.arange(3.0)), state
    assert back["w"].a.sharding.device_set <= set(jax.local_devices()), back["w"].a.sharding
    np.testing.assert_array_equal(np.asarray(back["w"].a), np.asarray(lp["w"].a))
    np.testing.assert_array_equal(np.asarray(back["w"].b), 0.5)

    # 2. a global base sharded over every process's devices
    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    sharded = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("data", "model"))),
               "bias": jax.device_put(jnp.zeros(4), NamedSharding(mesh, P()))}
    lp = lorax.init(jax.random.key(0), config, fn, sharded, x)
    lorax.save(f"{folder}/global", lp)
    back = lorax.load(f"{folder}/global", sharded)
    assert back["w"].a.sharding.spec == P("data", None), back["w"].a.sharding
    gather = lambda v: np.asarray(jax.jit(lambda v: v, out_shardings=NamedSharding(mesh, P()))(v))  # noqa: E731
    np.testing.assert_array_equal(gather(back["w"].a), gather(lp["w"].a))
    print(f"process {jax.process_index()}: ok", flush=True)


def resume_on_the_global_mesh(folder: str) -> None:
    """Save mid-training on a mesh over every process's devices, load with a fresh optimizer state as the
    template, take the next jitted steps: the uninterrupted run's adapters and optimizer state."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lorax

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["bias"]  # noqa: E731
    base = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8) / 64, NamedSharding(mesh, P("data", "model"))),
            "bias": jax.device_put(jnp.zeros(8), NamedSharding(mesh, P()))}
    xs = [jax.device_put(jnp.sin(jnp.arange(32.0) + i).reshape(4, 8), NamedSharding(mesh, P("data")))
          for i in range(4)]
    fresh = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2, trainable="bias"), fn, base, xs[0])
    tx = optax.adamw(1e-1, weight_decay=0.1)

    @jax.jit
    def step(t, f, opt, x):
        grads = jax.grad(lambda t: jnp.mean((lorax.lora(fn)(lorax.combine(t, f), x) - 0.5) ** 2))(t)
        updates, opt = tx.update(grads, opt, t)
        return optax.apply_updates(t, updates), opt

    trainable, frozen = lorax.split(fresh)
    opt = tx.init(trainable)
    for i, x in enumerate(xs):
        if i == 2:
            lorax.save(f"{folder}/resume", lorax.combine(trainable, frozen), state={"opt": opt, "step": i})
        trainable, opt = step(trainable, frozen, opt, x)
    back, state = lorax.load(f"{folder}/resume", base, state={"opt": tx.init(lorax.split(fresh)[0]), "step": 0})
    assert state["opt"][0].count.sharding == NamedSharding(mesh, P()), state["opt"][0].count.sharding
    resumed, resumed_frozen = lorax.split(back)
    for x in xs[state["step"]:]:
        resumed, state["opt"] = step(resumed, resumed_frozen, state["opt"], x)
    gather = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))
    for got, want in zip(jax.tree.leaves(gather((resumed, state["opt"]))), jax.tree.leaves(gather((trainable, opt)))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    print(f"process {jax.process_index()}: resumed ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
