"""LoRA fine-tuning of a LLaMA-style model over a (data x model) device mesh.

The same code runs on a TPU/GPU pod (call ``jax.distributed.initialize()`` first on each
host) or, for a try on one machine, on fake CPU devices:

    python examples/sharded_finetune.py --cpu-devices 8

The base weights are sharded tensor-parallel over ``model`` (column-parallel q/k/v/gate/up,
row-parallel o/down) and the batch over ``data``; lorax places each adapter after its
weight and `lorax.partition_specs` gives the jit shardings.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=0, help="fake this many CPU devices (0: use the real ones)")
    parser.add_argument("--model-parallel", type=int, default=4, help="size of the mesh's model axis")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    return parser.parse_args(argv)


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
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding

    import lorax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llama import Llama, LlamaConfig

    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(-1, args.model_parallel), ("data", "model"))
    print(f"mesh: {dict(mesh.shape)} over {devices.size} {jax.default_backend()} devices")

    config = LlamaConfig(vocab=256, dim=128, layers=4, heads=8, kv_heads=4, hidden=256, max_len=args.seq)
    model = Llama(config)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    ids_shape = (args.batch, args.seq)
    host_params = model.init(jax.random.key(0), jnp.zeros(ids_shape, jnp.int32))
    path = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
    specs = jax.tree_util.tree_map_with_path(lambda p, x: base_spec(path(p), x.ndim), host_params)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host_params, specs)

    example = jax.device_put(jnp.zeros(ids_shape, jnp.int32), NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=args.rank, alpha=2.0 * args.rank), fn, params, example)
    q = lp["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    print(f"q_proj: w {q.w.sharding.spec}  a {q.a.sharding.spec}  b {q.b.sharding.spec}")

    trainable, frozen = lorax.split(lp)
    t_specs, _ = lorax.split(lorax.partition_specs(lp))
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree)  # noqa: E731
    tx = optax.adamw(3e-3)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen, ids):
        def loss(t):
            logits = lorax.lora(fn)(lorax.combine(t, frozen), ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = jax.lax.with_sharding_constraint(optax.apply_updates(trainable, updates), named(t_specs))
        return trainable, opt_state, value

    # a learnable stream: each sequence counts up from a random start
    rng = np.random.default_rng(0)
    for i in range(args.steps):
        start = rng.integers(0, config.vocab, (args.batch, 1))
        ids = jax.device_put(jnp.asarray((start + np.arange(args.seq)) % config.vocab, jnp.int32),
                             example.sharding)
        trainable, opt_state, value = step(trainable, opt_state, frozen, ids)
        if i % max(1, args.steps // 6) == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {float(value):.4f}")
    a = trainable["params"]["layers"]["self_attn"]["q_proj"]["kernel"].a
    print(f"after training, q_proj a sharding: {a.sharding.spec}")


if __name__ == "__main__":
    main()
