"""Property tests: the factored rules agree with the merged weight for random layouts."""

import jax
import jax.numpy as jnp
from helpers import assert_trees_close, examples, with_random_b
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import lorax

SETTINGS = settings(max_examples=examples(25), deadline=None)


@st.composite
def dot_layouts(draw):
    """A weight of 2-3 axes, some contracted with x, maybe a shared batch axis, on either side."""
    w_shape = draw(st.lists(st.integers(2, 4), min_size=2, max_size=3))
    axes = list(range(len(w_shape)))
    batch = draw(st.lists(st.sampled_from(axes), max_size=1, unique=True)) if len(w_shape) == 3 else []
    rest = [a for a in axes if a not in batch]
    n_contract = draw(st.integers(1, len(rest) - 1))
    contract = draw(st.permutations(rest))[:n_contract]
    x_free = draw(st.lists(st.integers(1, 3), max_size=2))
    # x: batch axes first, then its free axes, then the contracted axes in w's order
    x_shape = [w_shape[a] for a in batch] + x_free + [w_shape[a] for a in contract]
    x_batch = list(range(len(batch)))
    x_contract = list(range(len(batch) + len(x_free), len(x_shape)))
    weight_is_lhs = draw(st.booleans())
    return w_shape, x_shape, (x_contract, contract), (x_batch, batch), weight_is_lhs


@SETTINGS
@given(dot_layouts(), st.integers(0, 2**16))
def test_dot_general_rule_matches_merged_weight(layout, seed):
    w_shape, x_shape, (xc, wc), (xb, wb), weight_is_lhs = layout

    def fn(p, x):
        if weight_is_lhs:
            return lax.dot_general(p["w"], x, ((wc, xc), (wb, xb)))
        return lax.dot_general(x, p["w"], ((xc, wc), (xb, wb)))

    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, w_shape)}
    x = jax.random.normal(jax.random.fold_in(key, 1), x_shape)
    lp = with_random_b(lorax.init(key, lorax.LoraConfig(rank=1, alpha=3.0), fn, params, x), key)
    lw = lp["w"]
    assert set(lw.a_axes) == set(wc) and set(lw.stack_axes) == set(wb)
    assert_trees_close(jax.jit(lorax.lora(fn))(lp, x), jax.jit(fn)(lorax.merge(lp), x), rtol=1e-4, atol=1e-5)
    assert lorax.explain(fn, lp, x).rows[0].how == "factored (dot_general)"


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from(["SAME", "VALID"]),
       st.integers(1, 2), st.integers(1, 2), st.integers(0, 2**16))
def test_conv_rule_matches_merged_weight(kh, kw, padding, stride, dilation, seed):
    def fn(p, x):
        return lax.conv_general_dilated(x, p["k"], (stride, stride), padding, rhs_dilation=(dilation, 1),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    key = jax.random.key(seed)
    params = {"k": jax.random.normal(key, (kh, kw, 3, 5))}
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 7, 6, 3))
    lp = with_random_b(lorax.init(key, lorax.LoraConfig(rank=2), fn, params, x), key)
    assert_trees_close(jax.jit(lorax.lora(fn))(lp, x), jax.jit(fn)(lorax.merge(lp), x), rtol=1e-4, atol=1e-5)
    assert lorax.explain(fn, lp, x).rows[0].how == "factored (conv_general_dilated)"


@SETTINGS
@given(st.integers(3, 9), st.integers(2, 6), st.lists(st.integers(1, 3), min_size=1, max_size=2),
       st.integers(0, 2**16))
def test_lookup_rule_matches_merged_table(vocab, dim, idx_shape, seed):
    fn = lambda p, ids: jnp.take(p["e"], ids, axis=0)  # noqa: E731
    key = jax.random.key(seed)
    params = {"e": jax.random.normal(key, (vocab, dim))}
    ids = jax.random.randint(key, idx_shape, 0, vocab)
    config = lorax.LoraConfig(rank=1, targets="e")
    lp = with_random_b(lorax.init(key, config, fn, params, ids), key)
    assert_trees_close(jax.jit(lorax.lora(fn))(lp, ids), jax.jit(fn)(lorax.merge(lp), ids), rtol=1e-5, atol=1e-6)
