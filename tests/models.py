"""Small models of every kind lorax must adapt without edits to their code."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from lorax_examples.gpt import GPT  # noqa: F401  (shared with the benchmarks)


class MLP(nn.Module):
    features: tuple = (16, 32, 8)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), padding="VALID")(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.heads = nnx.Einsum("bi,ihd->bhd", (16, 2, 4), rngs=rngs)
        self.down = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.heads(nnx.relu(self.up(x)))
        return self.down(h.reshape(h.shape[0], -1))


def plain_fn(params, x):
    """A raw function: a weight used transposed, in a while loop and a cond."""
    h = jnp.tanh(x @ params["w1"])
    h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ params["w2"].T), h)
    return jax.lax.cond(h.sum() > 0, lambda h: h @ params["w3"], lambda h: -(h @ params["w3"]), h)


def plain_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (6, 12)) / 3, "w2": jax.random.normal(k2, (12, 12)) / 4,
            "w3": jax.random.normal(k3, (12, 5)) / 4}
