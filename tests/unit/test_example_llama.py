"""The example LLaMA's rotary embedding is transformers' rotate-half form; its grouped-query attention
is each query head's softmax attention over its kv head; its bf16 gating is the gating of bf16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lorax_examples.llama import attend, bf16_gating, gating, rope


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
