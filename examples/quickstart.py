"""lorax in one screen: adapt a pretrained model to a new task with LoRA.

A small MLP is first trained on one function (the "pretrained" base), then LoRA
adapters of rank 4 learn a second function while the base stays frozen. Prints the
loss going down, the trainable share, and that the merged model equals the adapted one.

    python examples/quickstart.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lorax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (256, 256):
            x = nn.gelu(nn.Dense(width)(x))
        return nn.Dense(1)(x)


def train(loss, params, steps, lr):
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    for i in range(steps):
        params, state, value = step(params, state)
        if i % (steps // 5) == 0 or i == steps - 1:
            print(f"  step {i:4d}  loss {float(value):.5f}")
    return params


def main():
    model = MLP()
    fn = lambda params, x: model.apply(params, x)  # noqa: E731
    x = jnp.linspace(-3, 3, 512)[:, None]
    base_task, new_task = jnp.sin(x), jnp.sin(x) + 0.5 * jnp.cos(3 * x)

    print("pretraining the base model on sin(x)")
    base = train(lambda p: jnp.mean((fn(p, x) - base_task) ** 2), model.init(jax.random.key(0), x), 400, 3e-3)

    # rank 4 inside; the 1-wide input and output layers can hold rank 1 at most
    config = lorax.LoraConfig(rank=4, alpha=8.0, rank_pattern={r".*Dense_(0|2)/kernel": 1})
    params = lorax.init(jax.random.key(1), config, fn, base, x)
    print("\nwhat lorax adapted:")
    print(lorax.explain(fn, params, x))

    trainable, frozen = lorax.split(params)
    new_loss = lambda t: jnp.mean((lorax.lora(fn)(lorax.combine(t, frozen), x) - new_task) ** 2)  # noqa: E731
    print("\nLoRA fine-tuning on sin(x) + 0.5 cos(3x), base frozen")
    frozen_before = jax.tree.map(jnp.copy, frozen)
    trainable = train(new_loss, trainable, 600, 3e-3)

    params = lorax.combine(trainable, frozen)
    merged = lorax.merge(params)
    gap = float(jnp.abs(lorax.lora(fn)(params, x) - fn(merged, x)).max())
    print(f"\nmerged vs unmerged outputs: max |difference| = {gap:.2e}")
    base_untouched = all(map(jnp.array_equal, jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)))
    print(f"frozen base weights bit-identical after training: {base_untouched}")


if __name__ == "__main__":
    main()
