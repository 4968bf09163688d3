"""The example LLaMA's rotary embedding is transformers' rotate-half form; its grouped-query attention
is each query head's softmax attention over its kv head, and its causal attention in query blocks
the same with less work; its bf16 gating is the gating of bf16 inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lorax_examples.llama import (
    Llama,
    LlamaConfig,
    attend,
    attention_blocks_setting,
    bf16_gating,
    causal_attend,
    gating,
    rope,
)


def test_rope_is_x_cos_plus_rotate_half_x_sin_at_each_position():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    angles = np.concatenate([positions[..., None] * inv_freq] * 2, axis=-1)[:, :, None, :]
    rotated = np.concatenate([-np.asarray(x)[..., 4:], np.asarray(x)[..., :4]], axis=-1)
    expected = np.asarray(x) * np.cos(angles) + rotated * np.sin(angles)
    np.testing.assert_allclose(rope(x, positions, 10000.0), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rope(x, jnp.zeros_like(positions), 10000.0), x)  # position 0: no rotation


@pytest.mark.parametrize("seq, slots, mask_rows", [(6, 6, 1), (2, 7, 3)])
def test_attend_is_each_query_heads_softmax_attention_over_its_kv_head(seq, slots, mask_rows):
    """Query head h reads kv head h // groups; a mask of one row or one per batch row (a cache's)."""
    heads, kv_heads, hd = 6, 2, 4
    key = jax.random.split(jax.random.key(0), 4)
    q = np.asarray(jax.random.normal(key[0], (3, seq, heads, hd)))
    k, v = (np.asarray(jax.random.normal(kk, (3, slots, kv_heads, hd))) for kk in key[1:3])
    mask = np.array(jax.random.bernoulli(key[3], 0.7, (mask_rows, 1, seq, slots)))
    mask[..., 0] = True  # every query sees at least one slot
    expected = np.zeros_like(q)
    for b in range(3):
        for h in range(heads):
            logits = q[b, :, h] @ k[b, :, h // 3].T / np.sqrt(hd)
            logits = np.where(mask[b % mask_rows, 0], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            expected[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // 3]
    np.testing.assert_allclose(attend(q, k, v, mask, groups=3), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq, blocks", [(12, 4), (10, 3), (3, 8), (9, 1)])
def test_causal_attention_in_query_blocks_is_masked_attention_in_values_and_gradients(seq, blocks):
    """Uneven blocks (10 in 3), more blocks than queries (3 in 8) and one block included."""
    key = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(key[0], (2, seq, 6, 4))
    k, v = (jax.random.normal(kk, (2, seq, 2, 4)) for kk in key[1:3])
    cotangent = jax.random.normal(key[3], q.shape)
    mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
    blocked = jax.jit(lambda *x: jax.vjp(lambda q, k, v: causal_attend(q, k, v, 3, blocks), *x[:3])[1](x[3]))
    whole = jax.jit(lambda *x: jax.vjp(lambda q, k, v: attend(q, k, v, mask, 3), *x[:3])[1](x[3]))
    np.testing.assert_allclose(causal_attend(q, k, v, 3, blocks), attend(q, k, v, mask, 3), rtol=1e-5, atol=1e-6)
    for got, expected in zip(blocked(q, k, v, cotangent), whole(q, k, v, cotangent)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_query_blocks_skip_the_keys_no_query_of_a_block_sees():
    """XLA's flop count of the model's forward and backward: 4 blocks of 64 queries do 5/8 of
    attention's products (the projections and the head are unchanged), with the same loss."""
    config = LlamaConfig(vocab=64, dim=32, layers=1, heads=4, kv_heads=2, hidden=32, remat=False)
    ids = jax.random.randint(jax.random.key(0), (1, 257), 0, 64)
    params = Llama(config).init(jax.random.key(1), ids[:, :-1])

    def flops_and_loss(blocks):
        model = Llama(dataclasses.replace(config, attention_blocks=blocks))
        loss = jax.jit(jax.value_and_grad(lambda p: model.apply(p, ids[:, :-1], targets=ids[:, 1:])))
        return loss.lower(params).compile().cost_analysis()["flops"], loss(params)[0]

    (whole, loss_whole), (blocked, loss_blocked) = flops_and_loss(1), flops_and_loss(4)
    # attention: q·kᵀ and p·v forward, again in the backward's recomputation, and 3 products of their gradients
    attention = 7 * 2 * 4 * 256 * 256 * 8
    assert whole - blocked == pytest.approx(attention * 3 / 8, rel=0.05)
    np.testing.assert_allclose(loss_blocked, loss_whole, rtol=1e-6)


@pytest.mark.parametrize("blocks", [0, -2, 2.0, True, "4"])
def test_attention_blocks_refuses_what_is_not_a_whole_number_from_1(blocks):
    with pytest.raises(ValueError, match="attention-blocks takes a whole number from 1"):
        attention_blocks_setting(blocks)


def test_bf16_gating_is_the_gating_of_its_inputs_rounded_to_bf16_with_its_gradients():
    gate, up, cotangent = jax.random.normal(jax.random.key(0), (3, 4, 16)) * 3
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (gate, up)]
    assert not jnp.array_equal(rounded[0], gate)  # the inputs are not bf16 already
    out, vjp = jax.vjp(bf16_gating, gate, up)
    expected, expected_vjp = jax.vjp(gating, *rounded)
    np.testing.assert_array_equal(out, expected)
    for got, want in zip(vjp(cotangent), expected_vjp(cotangent)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
