"""A training loop that survives kill -9 and preemption: the full training state in each checkpoint.

    python examples/resumable_train.py --out /tmp/run --steps 60 --save-every 10
    python examples/resumable_train.py --out /tmp/run --steps 60 --save-every 10 --resume

Each `lorax.save` holds the adapters and, as ``state=``, the optimizer state, the step, the
dropout RNG key (as key data) and the data position; the loop saves every --save-every
steps and at the last one. On SIGTERM the loop saves at the next step boundary and exits 0.
``--resume`` continues from the latest checkpoint in --out up to --steps, and losses.jsonl
carries on from the saved step. A resumed run's losses equal an uninterrupted run's, bit for
bit on CPU (tests/integration/test_resume.py kills this script with SIGKILL and SIGTERM to check it).

The same loop runs as a multi-process job, one process per host, here two local processes of
two fake CPU devices each (start both; --coordinator is process 0's address):

    python examples/resumable_train.py --out /tmp/run --processes 2 --process-id 0 \
        --coordinator 127.0.0.1:5555 --cpu-devices 2          # and --process-id 1 alongside

The base weights are then sharded tensor-parallel over a (data x model) mesh of every
process's devices, each process feeds its own rows of the batch, and every process saves
and loads the one checkpoint folder together (it must be shared). SIGTERM may reach the
hosts at different times: at each step boundary the processes agree to stop if any of them
was told to, so all save the same step and exit 0. ``--resume`` on every process continues
the run; `lorax.load` places the restored optimizer state on the mesh. Process 0 alone
prints and writes losses.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoints and losses.jsonl")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause per step (tests interrupt it)")
    p.add_argument("--processes", type=int, default=1, help="processes in the run (one per host)")
    p.add_argument("--process-id", type=int, default=0, help="this process's index, 0 to --processes - 1")
    p.add_argument("--coordinator", default="127.0.0.1:5555", help="host:port of process 0, for --processes > 1")
    p.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices per process (0: the real ones)")
    return p.parse_args(argv)


class Preemption:
    """Turns SIGTERM into a flag the loop reads at each step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "requested", True))


def problem():
    """The data, model and base weights every run (and every process) builds alike."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    data = np.random.default_rng(0)
    xs = data.normal(size=(512, 16)).astype(np.float32)
    ys = np.tanh(xs @ data.normal(size=(16, 4))).astype(np.float32)
    fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    base = {"w1": jax.random.normal(jax.random.key(0), (16, 32)) / 4,
            "w2": jax.random.normal(jax.random.key(1), (32, 4))}
    return xs, ys, fn, base


class Hosts:
    """What changes on a multi-process run: where the base and the batch live, and agreeing to stop."""

    def __init__(self, processes: int):
        import jax
        import numpy as np
        from jax.sharding import Mesh

        self.processes = processes
        self.mesh = Mesh(np.array(jax.devices()).reshape(processes, -1), ("data", "model")) if processes > 1 else None
        self.primary = jax.process_index() == 0

    def place_base(self, base: dict) -> dict:
        """Tensor-parallel over ``model``: w1 by columns, w2 by rows (every process holds the same values)."""
        import jax
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        if self.mesh is None:
            return base
        specs = {"w1": P(None, "model"), "w2": P("model", None)}
        host = {k: np.asarray(v) for k, v in base.items()}
        return {k: jax.make_array_from_callback(v.shape, NamedSharding(self.mesh, specs[k]), lambda i, v=v: v[i])
                for k, v in host.items()}

    def batch(self, rows):
        """The global batch; on many processes each feeds only its own share of the rows."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        if self.mesh is None:
            return rows
        local = rows.reshape(self.processes, -1, *rows.shape[1:])[jax.process_index()]
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P("data")), local, rows.shape)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (a collective: every process calls it)."""
        import numpy as np
        from jax.experimental import multihost_utils

        if self.mesh is None:
            return flag
        return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    import jax

    if args.processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                                   process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lorax

    preemption = Preemption()
    hosts = Hosts(args.processes)
    log = print if hosts.primary else (lambda *a, **k: None)
    xs, ys, fn, base = problem()
    base = hosts.place_base(base)
    lp = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=4, dropout=0.1), fn, base, xs[:1])
    trainable, frozen = lorax.split(lp)
    tx = optax.adam(3e-2)
    state = {"opt": tx.init(trainable), "step": 0, "key": jax.random.key_data(jax.random.key(3)), "position": 0}
    ckpt, log_file = args.out / "ckpt", args.out / "losses.jsonl"
    if args.resume and ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
        params, state = lorax.load(ckpt, base, state=state)
        trainable, frozen = lorax.split(params)
        log(f"resumed at step {state['step']}", flush=True)
    losses = []
    if hosts.primary:
        args.out.mkdir(parents=True, exist_ok=True)
        losses = [json.loads(line) for line in log_file.read_text().splitlines()][: state["step"]] \
            if log_file.exists() else []
        log_file.write_text("".join(f"{json.dumps(v)}\n" for v in losses))

    @jax.jit
    def train_step(trainable, opt_state, frozen, x, y, key):
        def loss(t):
            return jnp.mean((lorax.lora(fn, rng=key)(lorax.combine(t, frozen), x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    def save():
        lorax.save(ckpt, lorax.combine(trainable, frozen), step=state["step"], keep=2, state=state)

    while state["step"] < args.steps:
        key, sub = jax.random.split(jax.random.wrap_key_data(state["key"]))
        rows = np.arange(state["position"], state["position"] + args.batch) % len(xs)
        trainable, opt, value = train_step(trainable, state["opt"], frozen, hosts.batch(xs[rows]),
                                           hosts.batch(ys[rows]), sub)
        state = {"opt": opt, "step": state["step"] + 1, "key": jax.random.key_data(key),
                 "position": state["position"] + args.batch}
        losses.append(float(value))
        if hosts.primary:
            with log_file.open("a") as out:
                out.write(f"{json.dumps(losses[-1])}\n")
        time.sleep(args.sleep)
        stop = hosts.any(preemption.requested)
        if state["step"] % args.save_every == 0 or state["step"] == args.steps or stop:
            save()
        if stop:
            log(f"preempted: saved step {state['step']}, exiting", flush=True)
            return losses
    return losses


if __name__ == "__main__":
    main()
