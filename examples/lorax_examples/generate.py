"""Autoregressive generation with a KV cache: one prefill, then one-token decode steps.

`generate` takes the model call as an argument, ``step(params, ids, positions, cache) ->
(logits, cache)`` (``llama.cached_step(config)``, wrapped in `lorax.lora` for adapted
params), and ``empty_cache(batch, slots)``. Prefill and decode are each compiled once per
shape and reused across calls, prompts, keys and sampling settings (those are traced
arguments), as long as the same ``step`` object is passed. ``params`` is passed through to
``step`` untouched: `routed` makes a step whose params are ``(bank, index)``, a
`lorax.LoraBank` tree and one adapter index per request.

>>> import jax
>>> from lorax_examples import llama
>>> config = llama.LlamaConfig(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, hidden=64, remat=False)
>>> params = llama.Llama(config).init(jax.random.key(0), jax.numpy.zeros((1, 4), int))
>>> step = llama.cached_step(config)
>>> out = generate(step, params, lambda b, n: llama.init_cache(config, b, n), [[1, 2, 3], [4, 5]], max_new=4)
>>> [len(tokens) for tokens in out]
[4, 4]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lorax

Step = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def routed(step: Step) -> Step:
    """``step`` over ``(bank, index)``: several named adapters of one base (`lorax.adapters.bank`)
    and, per request row, the adapter it uses (`lorax.adapters.index_of`; ``BASE`` for none).
    Prefill and every decode step gather each row's factors; a new index or other adapters of
    the same shapes reuse the compiled programs. Build it once, as ``step``."""
    adapted = lorax.lora(step)

    def run(params, ids, positions, cache):
        bank, index = params
        return adapted(lorax.adapters.route(bank, index), ids, positions, cache)

    return run


def pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token per row of ``logits`` [batch, vocab]: the argmax when ``temperature`` is 0, else a
    sample from ``softmax(logits / temperature)`` cut to its top-p nucleus (the most likely tokens
    whose probabilities reach ``top_p``; the top token always stays).

    >>> pick(jnp.array([[0.0, 2.0, 1.0]]), jax.random.key(0), 0.0, 1.0).tolist()
    [1]
    """

    def sample(logits):
        scaled = logits / temperature
        ranked = jnp.sort(scaled, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before a token is below top_p
        floor = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(scaled >= floor, scaled, -jnp.inf), axis=-1)

    greedy = lambda logits: jnp.argmax(logits, axis=-1)  # noqa: E731
    return jax.lax.cond(temperature > 0, sample, greedy, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="step", donate_argnames="cache")
def prefill(step: Step, params, ids, lengths, cache, key, temperature, top_p):
    """Run the padded prompts ``ids`` [batch, t] through ``step``; the first new token of each row."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, cache = step(params, ids, positions, cache)
    last = logits[jnp.arange(ids.shape[0]), lengths - 1]
    return pick(last, jax.random.fold_in(key, 0), temperature, top_p), cache


@functools.partial(jax.jit, static_argnames="step", donate_argnames="cache")
def decode(step: Step, params, tokens, positions, cache, key, index, temperature, top_p):
    """One token per row: ``tokens`` [batch] at ``positions`` [batch] in, the next ones out."""
    logits, cache = step(params, tokens[:, None], positions[:, None], cache)
    return pick(logits[:, 0], jax.random.fold_in(key, index), temperature, top_p), cache


def generate(step: Step, params: Any, empty_cache: Callable[[int, int], Any], prompts: Sequence[Sequence[int]], *,
             max_new: int, eos_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, slots: int | None = None) -> list[list[int]]:
    """Up to ``max_new`` new tokens per prompt (a row stops at ``eos_id``, which is not returned).

    Greedy when ``temperature`` is 0; sampling needs ``key`` and is reproducible with it.
    ``slots``: the cache length, by default the longest prompt plus ``max_new`` (fix it to
    share one decode compilation across prompt lengths).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new < 1:
        raise ValueError(f"generate: max_new must be at least 1, got {max_new}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a jax.random key")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    slots = width + max_new if slots is None else slots
    if width + max_new > slots:
        raise ValueError(f"generate: a prompt of {width} tokens + {max_new} new exceeds the cache of {slots} slots")
    ids = np.zeros((len(prompts), width), np.int32)
    for row, prompt in zip(ids, prompts):
        row[: len(prompt)] = prompt
    key = jax.random.key(0) if key is None else key
    sampling = (jnp.float32(temperature), jnp.float32(top_p))
    tokens, cache = prefill(step, params, ids, lengths, empty_cache(len(prompts), slots), key, *sampling)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for i in range(max_new):
        for row, token in enumerate(np.asarray(tokens).tolist()):
            done[row] |= token == eos_id
            if not done[row]:
                out[row].append(token)
        if done.all() or i == max_new - 1:
            break
        tokens, cache = decode(step, params, tokens, lengths + i, cache, key, i + 1, *sampling)
    return out


@functools.partial(jax.jit, static_argnames="fn")
def _argmax_at(fn: Callable, params, ids, n):
    return jnp.argmax(fn(params, ids)[0, n - 1])


def greedy_by_recompute(fn: Callable, params: Any, prompt: Sequence[int], *, max_new: int, window: int,
                        eos_id: int | None = None) -> list[int]:
    """The cache-free reference: re-run ``fn(params, ids) -> logits`` over a fixed ``window`` of
    tokens for every new token (one compilation, quadratic work)."""
    if len(prompt) + max_new > window:
        raise ValueError(f"prompt of {len(prompt)} tokens + {max_new} new exceeds the window of {window}")
    buf = np.zeros((1, window), np.int32)
    buf[0, : len(prompt)] = prompt
    n = len(prompt)
    for _ in range(max_new):
        token = int(_argmax_at(fn, params, buf, n))
        if token == eos_id:
            break
        buf[0, n] = token
        n += 1
    return buf[0, len(prompt): n].tolist()
