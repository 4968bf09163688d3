"""A training loop that survives kill -9 and preemption: the full training state in each checkpoint.

    python examples/resumable_train.py --out /tmp/run --steps 60 --save-every 10
    python examples/resumable_train.py --out /tmp/run --steps 60 --save-every 10 --resume

Each `lorax.save` holds the adapters and, as ``state=``, the optimizer state, the step, the
dropout RNG key (as key data) and the data position. On SIGTERM the loop saves at the next
step boundary and exits 0. A resumed run's losses equal an uninterrupted run's, bit for bit
on CPU (tests/test_resume.py kills this script with SIGKILL and SIGTERM to check it).
"""

from __future__ import annotations

import argparse
import json
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
    return p.parse_args(argv)


class Preemption:
    """Turns SIGTERM into a flag the loop reads at each step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "requested", True))


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lorax

    preemption = Preemption()
    data = np.random.default_rng(0)
    xs = data.normal(size=(512, 16)).astype(np.float32)
    ys = np.tanh(xs @ data.normal(size=(16, 4))).astype(np.float32)
    fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    base = {"w1": jax.random.normal(jax.random.key(0), (16, 32)) / 4,
            "w2": jax.random.normal(jax.random.key(1), (32, 4))}
    lp = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=4, dropout=0.1), fn, base, xs[:1])
    trainable, frozen = lorax.split(lp)
    tx = optax.adam(3e-2)
    state = {"opt": tx.init(trainable), "step": 0, "key": jax.random.key_data(jax.random.key(3)), "position": 0}
    ckpt, log = args.out / "ckpt", args.out / "losses.jsonl"
    if args.resume and ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
        params, state = lorax.load(ckpt, base, state=state)
        trainable, frozen = lorax.split(params)
        print(f"resumed at step {state['step']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    losses = [json.loads(line) for line in log.read_text().splitlines()][: state["step"]] if log.exists() else []
    log.write_text("".join(f"{json.dumps(v)}\n" for v in losses))

    @jax.jit
    def train_step(trainable, opt_state, frozen, x, y, key):
        def loss(t):
            return jnp.mean((lorax.lora(fn, rng=key)(lorax.combine(t, frozen), x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    def save():
        lorax.save(ckpt, lorax.combine(trainable, frozen), step=state["step"], keep=2, state=state)

    with log.open("a") as out:
        while state["step"] < args.steps:
            key, sub = jax.random.split(jax.random.wrap_key_data(state["key"]))
            rows = np.arange(state["position"], state["position"] + args.batch) % len(xs)
            trainable, opt, value = train_step(trainable, state["opt"], frozen, xs[rows], ys[rows], sub)
            state = {"opt": opt, "step": state["step"] + 1, "key": jax.random.key_data(key),
                     "position": state["position"] + args.batch}
            losses.append(float(value))
            out.write(f"{json.dumps(losses[-1])}\n")
            out.flush()
            time.sleep(args.sleep)
            if state["step"] % args.save_every == 0 or preemption.requested:
                save()
            if preemption.requested:
                print(f"preempted: saved step {state['step']}, exiting", flush=True)
                return losses
    return losses


if __name__ == "__main__":
    main()
