"""One process of a local multi-process JAX run (``jax.distributed`` over gloo on CPU), for test_multihost.py.

    python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES FOLDER [save-load|locked]
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


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
