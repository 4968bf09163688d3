"""The two thin products against one einsum: every layout the rules hand them."""

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_trees_close

import lorax
from lorax._src.kinds.lowrank import low_rank_update

CASES = [
    ("bsd", "dr", "rhk", "bshk", dict(b=2, s=3, d=4, h=2, k=3)),  # multi-axis output kernel
    ("bshk", "hkr", "rd", "bsd", dict(b=2, s=3, d=4, h=2, k=3)),  # multi-axis contracted kernel
    ("db", "dr", "ro", "ob", dict(b=5, d=4, o=3)),                # x is [features, rows]: W·x
    ("bd", "rd", "or", "bo", dict(b=5, d=4, o=3)),                # tied head: x·Eᵀ through b first
    ("d", "dr", "ro", "o", dict(d=4, o=3)),                       # a single vector
    ("lbd", "ldr", "lro", "lbo", dict(l=2, b=3, d=4, o=5)),       # a stack used as a batch axis
]


@pytest.mark.parametrize("x_sub,first_sub,second_sub,out_sub,sizes", CASES)
def test_matches_one_einsum_in_value_and_gradient(x_sub, first_sub, second_sub, out_sub, sizes):
    sizes = dict(sizes, r=2)
    keys = jax.random.split(jax.random.key(0), 3)
    x, first, second = (jax.random.normal(k, [sizes[c] for c in sub])
                        for k, sub in zip(keys, (x_sub, first_sub, second_sub)))
    spec = f"{x_sub},{first_sub},{second_sub}->{out_sub}"

    def ours(x, f, s):
        return jnp.sum(jnp.sin(low_rank_update(x_sub, x, first_sub, f, second_sub, s, out_sub, 0.5)))

    def reference(x, f, s):
        return jnp.sum(jnp.sin(0.5 * jnp.einsum(spec, x, f, s)))

    assert_trees_close(jax.value_and_grad(ours, (0, 1, 2))(x, first, second),
                       jax.value_and_grad(reference, (0, 1, 2))(x, first, second), rtol=1e-5, atol=1e-6)


def test_rows_stay_contiguous_no_activation_transpose():
    """``x`` laid out [batch, seq, features] is only reshaped, never transposed."""
    x, a, b = jnp.ones((2, 3, 4)), jnp.ones((4, 2)), jnp.ones((2, 5))
    jaxpr = jax.make_jaxpr(lambda x: low_rank_update("bsd", x, "dr", a, "ro", b, "bso", 1.0))(x)
    assert not [e for e in jaxpr.eqns if e.primitive.name == "transpose" and e.invars[0].aval.size >= x.size]


def test_adapters_reading_one_input_share_its_view():
    """q, k and v read one x: one 2-D view of it, so their gradients keep one residual."""
    fn = lambda p, x: [x @ p[n] for n in "qkv"]  # noqa: E731
    params = {n: jnp.ones((4, 3)) for n in "qkv"}
    x = jnp.ones((2, 5, 4))
    lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, params, x)
    jaxpr = jax.make_jaxpr(lorax.lora(fn))(lp, x)
    views = [e for e in jaxpr.eqns if e.primitive.name == "reshape" and e.invars[0].aval.shape == x.shape]
    assert len(views) == 1
