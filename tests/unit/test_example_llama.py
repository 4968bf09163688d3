"""The example LLaMA's rotary embedding is transformers' rotate-half form."""

import jax
import jax.numpy as jnp
import numpy as np
from lorax_examples.llama import rope


def test_rope_is_x_cos_plus_rotate_half_x_sin_at_each_position():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    angles = np.concatenate([positions[..., None] * inv_freq] * 2, axis=-1)[:, :, None, :]
    rotated = np.concatenate([-np.asarray(x)[..., 4:], np.asarray(x)[..., :4]], axis=-1)
    expected = np.asarray(x) * np.cos(angles) + rotated * np.sin(angles)
    np.testing.assert_allclose(rope(x, positions, 10000.0), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rope(x, jnp.zeros_like(positions), 10000.0), x)  # position 0: no rotation
