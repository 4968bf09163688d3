"""LoRA fine-tuning of a LLaMA-style model over a (data x model) device mesh.

The same code runs on a TPU/GPU pod (``--distributed`` on every host) or, for a try on one
machine, on fake CPU devices, in one process or as a simulated two-host run:

    python examples/sharded_finetune.py --cpu-devices 8
    python examples/sharded_finetune.py --cpu-devices 4 --distributed --coordinator 127.0.0.1:5555 \
        --num-processes 2 --process-id 0    # and --process-id 1 in a second shell

The base weights are sharded tensor-parallel over ``model`` (column-parallel q/k/v/gate/up,
row-parallel o/down) and the batch over ``data``; lorax places each adapter after its
weight and `lorax.partition_specs` gives the jit shardings. With ``--distributed`` each host
feeds its own rows of the batch (``jax.make_array_from_process_local_data``); process 0 alone
prints, and ``--out`` saves the adapters, optimizer state and step (every process takes part)
at the last step and every ``--save-every`` steps, as step folders named by the step.

``--resume`` continues from the latest step saved in ``--out`` up to ``--steps`` (on every
process of a multi-process run): `lorax.load` reads the optimizer state back onto the mesh
(a fresh ``tx.init`` is its template), the data stream skips the batches already trained on,
and the run ends in the model and losses of an uninterrupted one:

    python examples/sharded_finetune.py --cpu-devices 8 --steps 30 --save-every 10 --out /tmp/ft
    python examples/sharded_finetune.py --cpu-devices 8 --steps 60 --out /tmp/ft --resume
"""

from __future__ import annotations

import argparse
import os
import re


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=0, help="fake this many CPU devices (0: use the real ones)")
    parser.add_argument("--model-parallel", type=int, default=4, help="size of the mesh's model axis")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", help="save the adapters, optimizer state and step here at the end")
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: at the end only)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest step saved in --out")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run (jax.distributed.initialize); the flags below, "
                             "else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else "
                             "the TPU/SLURM environment, say where the coordinator is")
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), help="host:port")
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    return parser.parse_args(argv)


def _env_int(name: str) -> int | None:
    return int(os.environ[name]) if name in os.environ else None


def llama_config(seq: int):
    """The small LLaMA this example trains (``seq`` tokens per sequence)."""
    from lorax_examples.llama import LlamaConfig

    return LlamaConfig(vocab=256, dim=128, layers=4, heads=8, kv_heads=4, hidden=256, max_len=seq)


def base_spec(path: str, ndim: int):
    """Tensor-parallel layout of the LLaMA params (stacked layers lead with None)."""
    from jax.sharding import PartitionSpec as P

    if re.search(r"(q|k|v|gate|up)_proj/kernel$", path):
        return P(None, None, "model")
    if re.search(r"(o|down)_proj/kernel$", path):
        return P(None, "model", None)
    if path.endswith("embed_tokens/embedding"):
        return P(None, "model")
    return P(*([None] * ndim))


def main(argv=None):
    args = parse_args(argv)
    if args.resume and not args.out:
        raise SystemExit("error: --resume needs --out, the folder of the run to continue")
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    import jax

    if args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from lorax_examples.llama import Llama

    import lorax

    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    devices = np.array(jax.devices())  # every host's, ordered by process: hosts split the data axis
    mesh = Mesh(devices.reshape(-1, args.model_parallel), ("data", "model"))
    log(f"mesh: {dict(mesh.shape)} over {devices.size} {jax.default_backend()} devices"
        f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}")

    def put(x, sharding):  # a value every host holds alike, as a global array
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def batch(rows):  # each host feeds only its own rows of the global batch
        sharding = NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        local = rows.reshape(jax.process_count(), -1, *rows.shape[1:])[jax.process_index()]
        return jax.make_array_from_process_local_data(sharding, local, rows.shape)

    config = llama_config(args.seq)
    model = Llama(config)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    ids_shape = (args.batch, args.seq)
    host_params = model.init(jax.random.key(0), jnp.zeros(ids_shape, jnp.int32))
    path = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
    specs = jax.tree_util.tree_map_with_path(lambda p, x: base_spec(path(p), x.ndim), host_params)
    params = jax.tree.map(lambda x, s: put(x, NamedSharding(mesh, s)), host_params, specs)

    example = batch(np.zeros(ids_shape, np.int32))
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=args.rank, alpha=2.0 * args.rank), fn, params, example)
    q = lp["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    log(f"q_proj: w {q.w.sharding.spec}  a {q.a.sharding.spec}  b {q.b.sharding.spec}")

    trainable, frozen = lorax.split(lp)
    t_specs, _ = lorax.split(lorax.partition_specs(lp))
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree)  # noqa: E731
    tx = optax.adamw(3e-3)
    opt_state = tx.init(trainable)
    start = 0
    if args.resume:  # the fresh optimizer state is the template: lorax.load places the saved one like it
        lp, state = lorax.load(os.path.abspath(args.out), params, state={"opt": opt_state, "step": 0})
        trainable, frozen = lorax.split(lp)
        opt_state, start = state["opt"], state["step"]
        log(f"resumed at step {start}")

    @jax.jit
    def step(trainable, opt_state, frozen, ids):
        def loss(t):
            logits = lorax.lora(fn)(lorax.combine(t, frozen), ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = jax.lax.with_sharding_constraint(optax.apply_updates(trainable, updates), named(t_specs))
        return trainable, opt_state, value

    def save(done: int) -> None:
        saved = lorax.save(os.path.abspath(args.out), lorax.combine(trainable, frozen), step=done,
                           state={"opt": opt_state, "step": done})
        log(f"saved {saved}")

    # a learnable stream: each sequence counts up from a random start
    rng = np.random.default_rng(0)
    for _ in range(start):  # a resumed run skips the batches already trained on
        rng.integers(0, config.vocab, (args.batch, 1))
    for i in range(start, args.steps):
        first = rng.integers(0, config.vocab, (args.batch, 1))
        ids = batch(((first + np.arange(args.seq)) % config.vocab).astype(np.int32))
        trainable, opt_state, value = step(trainable, opt_state, frozen, ids)
        if i % max(1, args.steps // 6) == 0 or i == args.steps - 1:
            log(f"step {i:3d}  loss {float(value):.6f}")
        if args.out and (i + 1 == args.steps or args.save_every and (i + 1) % args.save_every == 0):
            save(i + 1)
    a = trainable["params"]["layers"]["self_attn"]["q_proj"]["kernel"].a
    log(f"after training, q_proj a sharding: {a.sharding.spec}")


if __name__ == "__main__":
    main()
