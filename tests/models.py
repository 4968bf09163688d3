"""Small models of every kind lorax must adapt without edits to their code."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


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


class Block(nn.Module):
    d: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _):
        hd = self.d // self.heads
        dense = lambda name: nn.DenseGeneral((self.heads, hd), name=name, dtype=self.dtype)  # noqa: E731
        h = nn.LayerNorm(dtype=self.dtype)(x)
        q, k, v = dense("query")(h), dense("key")(h), dense("value")(h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        n = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="out", dtype=self.dtype)(o)
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.Dense(4 * self.d, name="fc", dtype=self.dtype)(h)
        return x + nn.Dense(self.d, name="proj", dtype=self.dtype)(nn.gelu(h)), None


class GPT(nn.Module):
    """GPT-style: multi-axis attention kernels, nn.scan over nn.remat blocks, tied head."""

    vocab: int = 64
    d: int = 32
    layers: int = 2
    heads: int = 4
    max_len: int = 16
    dtype: jnp.dtype = jnp.float32
    remat: bool = True

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.d, name="wte", dtype=self.dtype)
        pos = self.param("wpe", nn.initializers.normal(0.02), (self.max_len, self.d))
        x = embed(ids) + pos[: ids.shape[1]].astype(self.dtype)
        blocks = nn.scan(nn.remat(Block) if self.remat else Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.layers)
        x, _ = blocks(self.d, self.heads, self.dtype, name="h")(x, None)
        return embed.attend(nn.LayerNorm(dtype=self.dtype)(x))


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
