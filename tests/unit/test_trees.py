"""`split`, `combine`, `merge` and `unmerge`: exact round trips, and trees or factors that do not fit
refused by path."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from helpers import KEY, assert_trees_close, make_case, with_random_b

import lorax


def test_merge_unmerge_round_trip_and_merge_jits():
    fn, params, x = make_case("gpt")
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    merged = jax.jit(lorax.merge)(lp)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(m.dtype == p.dtype for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    back = lorax.unmerge(merged, lorax.split(lp)[0])
    assert_trees_close(lorax.split(back)[1], lorax.split(lp)[1], rtol=1e-5, atol=1e-6)
    assert_trees_close(lorax.lora(fn)(back, x), fn(merged, x), rtol=1e-4, atol=1e-5)


def test_combine_of_mismatched_trees_names_first_difference():
    fn, params, x = make_case("mlp")
    trainable, frozen = lorax.split(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    del frozen["params"]["Dense_1"]
    with pytest.raises(ValueError, match=r"first difference at 'params/Dense_1/bias'"):
        lorax.combine(trainable, frozen)
    with pytest.raises(ValueError, match=r"'params/Dense_0/bias' is None in trainable and None"):
        lorax.combine(trainable, trainable)
    _, frozen = lorax.split(lorax.init(KEY, lorax.LoraConfig(rank=2, alpha=4.0), fn, params, x))
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel': the trainable and frozen "
                                         r"LoraWeights do not come from one split"):
        lorax.combine(trainable, frozen)


def test_factors_that_do_not_fit_w_are_refused():
    fn, params, x = make_case("mlp")
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x)
    k = lp["params"]["Dense_1"]["kernel"]
    lp["params"]["Dense_1"]["kernel"] = dataclasses.replace(k, b=jnp.zeros((3, 32)))
    msg = r"LoraWeight at 'params/Dense_1/kernel': factors do not fit w \(16, 32\): got a \(16, 2\) and b \(3, 32\)"
    with pytest.raises(ValueError, match=msg):
        lorax.merge(lp)
    with pytest.raises(ValueError, match=msg):
        lorax.lora(fn)(lp, x)
