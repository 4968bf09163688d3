"""Generation with a KV cache (lorax_examples.generate) on a tiny random LLaMA, with and without LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, with_random_b
from lorax_examples import generate, llama

import lorax

CONFIG = llama.LlamaConfig(vocab=97, dim=32, layers=2, heads=4, kv_heads=2, hidden=64, max_len=64, remat=False)
MODEL = llama.Llama(CONFIG)
PROMPTS = [[5, 17, 3, 44, 9, 60, 2], [8, 1, 30], [71, 71, 12, 6]]


def fn(p, ids):
    return MODEL.apply(p, ids)


def empty_cache(batch, slots):
    return llama.init_cache(CONFIG, batch, slots)


@pytest.fixture(scope="module")
def adapted():
    """Random base and a LoRA on every projection with non-zero B (scale 0.3: it changes the tokens)."""
    base = MODEL.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    base = jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, base)  # peakier logits: greedy ties are unlikely
    params = lorax.init(KEY, lorax.LoraConfig(rank=4, alpha=8.0, targets=r".*_proj/kernel"), fn, base,
                        jnp.zeros((1, 8), jnp.int32))
    return base, with_random_b(params, scale=0.3)


STEP = lorax.lora(llama.cached_step(CONFIG))  # built once: generate's compilations are keyed on it


def test_cache_logits_equal_the_full_forward_of_the_merged_weights(adapted):
    _, params = adapted
    ids = jnp.array([[5, 17, 3, 44, 9, 60, 2, 11]])
    expected = fn(lorax.merge(params), ids)
    cache = empty_cache(1, 12)
    logits, cache = STEP(params, ids[:, :5], jnp.arange(5)[None], cache)  # prefill 5, then one at a time
    steps = [logits]
    for t in range(5, 8):
        logits, cache = STEP(params, ids[:, t:t + 1], jnp.array([[t]]), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, rtol=1e-4, atol=1e-4)


def test_cached_greedy_equals_window_recompute_with_lora(adapted):
    base, params = adapted
    cached = generate.generate(STEP, params, empty_cache, PROMPTS, max_new=12)
    merged = lorax.merge(params)
    for prompt, tokens in zip(PROMPTS, cached):
        assert tokens == generate.greedy_by_recompute(fn, merged, prompt, max_new=12, window=24)
    plain = generate.generate(llama.cached_step(CONFIG), base, empty_cache, PROMPTS, max_new=12)
    assert plain != cached  # the adapter changes what is generated


def test_sampling_is_reproducible_with_the_key_and_top_p_near_zero_is_greedy(adapted):
    _, params = adapted
    run = lambda **kw: generate.generate(STEP, params, empty_cache, PROMPTS, max_new=10, **kw)  # noqa: E731
    first = run(temperature=1.5, top_p=0.95, key=jax.random.key(7))
    assert first == run(temperature=1.5, top_p=0.95, key=jax.random.key(7))
    assert first != run(temperature=1.5, top_p=0.95, key=jax.random.key(8))
    assert run(temperature=1.5, top_p=1e-6, key=jax.random.key(7)) == run()


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: generate.pick(logits, k, jnp.float32(1.0), jnp.float32(0.75)))(
        jax.random.split(KEY, 2000))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.75: the tail is cut
    assert abs(counts[0] - 0.5 / 0.8) < 0.04


def test_eos_stops_each_row(adapted):
    _, params = adapted
    full = generate.generate(STEP, params, empty_cache, PROMPTS, max_new=12)
    eos = full[0][3]
    cut = generate.generate(STEP, params, empty_cache, PROMPTS, max_new=12, eos_id=eos)
    for tokens, stopped in zip(full, cut):
        assert stopped == (tokens[: tokens.index(eos)] if eos in tokens else tokens)
    assert len(cut[0]) <= 3


def test_prefill_and_decode_compile_once_each(adapted):
    _, params = adapted
    traced = []

    def counting_step(p, ids, positions, cache):
        traced.append(ids.shape[1])
        return STEP(p, ids, positions, cache)

    generate.generate(counting_step, params, empty_cache, PROMPTS, max_new=6)
    assert sorted(traced) == [1, 7]  # one prefill (longest prompt: 7) and one decode trace
    compiles = []

    def listen(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        other = [[p + 1 for p in PROMPTS[0]], [2, 2], [9]]  # same longest length, other tokens
        generate.generate(counting_step, params, empty_cache, other, max_new=6, temperature=0.8, top_p=0.9, key=KEY)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert sorted(traced) == [1, 7] and compiles == []  # nothing retraced or compiled for new prompts/sampling


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1, 2]], dict(max_new=4, slots=5), "a prompt of 2 tokens + 4 new exceeds the cache of 5 slots"),
    ([[1], []], dict(max_new=2), "every prompt needs at least one token"),
    ([[1]], dict(max_new=2, temperature=1.0), "sampling (temperature > 0) needs a jax.random key"),
    ([[1]], dict(max_new=2, top_p=0.0), "0 < top_p <= 1"),
    ([[1]], dict(max_new=0), "max_new must be at least 1"),
])
def test_bad_input(adapted, prompts, kwargs, message):
    _, params = adapted
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        generate.generate(STEP, params, empty_cache, prompts, **kwargs)


def test_per_request_adapters_generate_what_each_adapter_generates_alone(adapted):
    """One batch, three requests: adapter "a", adapter "b" and the base, each row equal to
    generating with its adapter alone (cache and decode steps gather per row)."""
    base, params = adapted
    other = with_random_b(lorax.init(jax.random.key(7), lorax.LoraConfig(rank=2, alpha=4.0, targets=r".*_proj/kernel"),
                                     fn, base, jnp.zeros((1, 8), jnp.int32)), scale=0.3)
    bank = lorax.adapters.bank({"a": params, "b": other})
    index = lorax.adapters.index_of(bank, ["a", "b", None])
    mixed = generate.generate(generate.routed(llama.cached_step(CONFIG)), (bank, index), empty_cache, PROMPTS,
                              max_new=8)
    alone = [generate.generate(STEP, params, empty_cache, PROMPTS[:1], max_new=8)[0],
             generate.generate(STEP, other, empty_cache, PROMPTS[1:2], max_new=8)[0],
             generate.generate(llama.cached_step(CONFIG), base, empty_cache, PROMPTS[2:], max_new=8)[0]]
    assert mixed == alone
