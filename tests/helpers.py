"""Shared helpers: models with their inputs, and adapters made non-zero."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx
from models import GPT, MLP, NNXMLP, ConvNet, plain_fn, plain_params

import lorax

KEY = jax.random.key(0)
ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**variables: str) -> dict[str, str]:
    """The environment of a child Python process: this one's, with lorax, the examples' package
    (`lorax_examples`) and the tests' helpers importable, and ``variables`` set."""
    path = os.pathsep.join(str(p) for p in (ROOT, ROOT / "examples", ROOT / "tests"))
    return dict(os.environ, PYTHONPATH=path, **variables)


def with_random_b(params, key=KEY, scale=0.1):
    """Give every adapter a non-zero b, so the update is really tested."""
    nodes = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, lorax.LoraWeight))
             if isinstance(x, lorax.LoraWeight)]
    keys = iter(jax.random.split(key, max(len(nodes), 1)))

    def fill(x):
        if isinstance(x, lorax.LoraWeight):
            b = jax.random.normal(next(keys), x.b.shape, jnp.float32) * scale
            return dataclasses.replace(x, b=b.astype(x.b.dtype))
        return x

    return jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, lorax.LoraWeight))


def linen_case(model, x):
    params = model.init(KEY, x)
    return (lambda p, x: model.apply(p, x)), params, x


def make_case(name: str):
    """``(fn, params, x)`` for one of the models lorax is tested on."""
    if name == "mlp":
        return linen_case(MLP(), jax.random.normal(KEY, (4, 10)))
    if name == "conv":
        return linen_case(ConvNet(), jax.random.normal(KEY, (2, 9, 9, 3)))
    if name in ("gpt", "gpt-bf16"):
        dtype = jnp.bfloat16 if name == "gpt-bf16" else jnp.float32
        return linen_case(GPT(dtype=dtype), jax.random.randint(KEY, (2, 8), 0, 64))
    if name == "nnx":
        graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
        return (lambda s, x: nnx.merge(graphdef, s)(x)), state, jax.random.normal(KEY, (4, 8))
    if name == "plain":
        return plain_fn, plain_params(KEY), jax.random.normal(KEY, (3, 6))
    if name == "equinox":
        model = eqx.nn.MLP(5, 3, 16, 2, key=KEY)
        return (lambda m, x: jax.vmap(m)(x)), model, jax.random.normal(KEY, (4, 5))
    raise ValueError(name)


CASES = ["mlp", "conv", "gpt", "gpt-bf16", "nnx", "plain", "equinox"]


@contextlib.contextmanager
def lock_held_by_another_process(folder):
    """Another process holds ``folder``'s writer lock (lorax's ``.lorax.lock``) meanwhile."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(folder / '.lorax.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)
