"""Public API, parameter budgets, merge round trips and every bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, make_case, with_random_b
from models import GPT

import lorax
from conftest import assert_trees_close


def test_public_api_is_pinned():
    assert lorax.__all__ == sorted(lorax.__all__)
    assert lorax.__all__ == ["Adapter", "DoraWeight", "Explanation", "LoraBank", "LoraConfig", "LoraWeight",
                             "QuantizedArray", "Trainable", "adapters", "combine", "explain", "gguf_tensor", "init",
                             "load", "lora", "merge", "merge_quantized", "optimizer", "partition_specs", "quantize",
                             "save", "split", "unmerge"]


@pytest.mark.parametrize("d, layers, rank, expected", [
    (1024, 24, 4, 393_216),  # GPT-2 medium, Wq and Wv
    (768, 12, 8, 294_912),   # RoBERTa-base, Wq and Wv
])
def test_paper_parameter_counts_built_abstractly(d, layers, rank, expected):
    model = GPT(vocab=50257, d=d, layers=layers, heads=16 if d == 1024 else 12, max_len=8)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    params = jax.eval_shape(model.init, KEY, ids)
    config = lorax.LoraConfig(rank=rank, targets=r".*/(query|value)/kernel")
    lp = jax.eval_shape(lambda p: lorax.init(KEY, config, fn, p, ids), params)
    assert lorax.explain(fn, lp, ids).trainable == expected


def test_merge_unmerge_round_trip_and_merge_jits():
    fn, params, x = make_case("gpt")
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    merged = jax.jit(lorax.merge)(lp)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(m.dtype == p.dtype for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    back = lorax.unmerge(merged, lorax.split(lp)[0])
    assert_trees_close(lorax.split(back)[1], lorax.split(lp)[1], rtol=1e-5, atol=1e-6)
    assert_trees_close(lorax.lora(fn)(back, x), fn(merged, x), rtol=1e-4, atol=1e-5)


def test_rank_alpha_patterns_and_rslora():
    fn, params, x = make_case("mlp")
    config = lorax.LoraConfig(rank=4, alpha=8.0, rank_pattern={r".*Dense_1/kernel": 2},
                              alpha_pattern={r".*Dense_2/kernel": 1.0}, use_rslora=True)
    lp = lorax.init(KEY, config, fn, params, x)["params"]
    assert [lp[f"Dense_{i}"]["kernel"].rank for i in range(3)] == [4, 2, 4]
    assert [lp[f"Dense_{i}"]["kernel"].scale for i in range(3)] == pytest.approx(
        [8 / 2, 8 / np.sqrt(2), 1 / 2])


def test_predicate_targets_exclude_and_trainable():
    fn, params, x = make_case("mlp")
    config = lorax.LoraConfig(rank=2, targets=lambda path, leaf: leaf.ndim == 2,
                              exclude=r".*Dense_0/.*", trainable=r".*/bias")
    lp = lorax.init(KEY, config, fn, params, x)["params"]
    assert not isinstance(lp["Dense_0"]["kernel"], lorax.LoraWeight)
    assert isinstance(lp["Dense_1"]["kernel"], lorax.LoraWeight)
    assert isinstance(lp["Dense_0"]["bias"], lorax.Trainable)


def test_init_distributions():
    fn, params, x = make_case("mlp")
    kaiming = lorax.init(KEY, lorax.LoraConfig(rank=4), fn, params, x)["params"]["Dense_1"]["kernel"]
    assert float(jnp.abs(kaiming.a).max()) <= 1 / np.sqrt(16)
    gauss = lorax.init(KEY, lorax.LoraConfig(rank=4, init="gaussian", dtype=jnp.bfloat16),
                       fn, params, x)["params"]["Dense_1"]["kernel"]
    assert gauss.a.dtype == gauss.b.dtype == jnp.bfloat16
    assert 0.1 < float(jnp.std(gauss.a.astype(jnp.float32))) < 0.5  # std 1/r = 0.25
    assert not np.any(np.asarray(gauss.b, np.float32))


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_over_a_bf16_base_default_to_fp32_and_keep_the_product_in_bf16(use_dora):
    fn, params, x = make_case("mlp")
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, use_dora=use_dora), fn, params16, x.astype(jnp.bfloat16))
    kernel = lp["params"]["Dense_1"]["kernel"]
    assert kernel.w.dtype == jnp.bfloat16 and kernel.a.dtype == kernel.b.dtype == jnp.float32
    lp = with_random_b(lp)
    x16 = x.astype(jnp.bfloat16)
    assert lorax.lora(fn)(lp, x16).dtype == jnp.bfloat16
    text = str(jax.make_jaxpr(lorax.lora(fn))(lp, x16))
    assert "bf16[4,2]" in text and "f32[4,2]" not in text  # x·A [batch 4, r 2] in the compute dtype
    trainable, frozen = lorax.split(lp)
    loss = lambda t: lorax.lora(fn)(lorax.combine(t, frozen), x16).astype(jnp.float32).sum()  # noqa: E731
    grads = jax.grad(loss)(trainable)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    # the reference: the same product with fp32 factors in a materialized fp32 model
    ref = jax.grad(lambda t: fn(lorax.merge(lorax.combine(t, jax.tree.map(lambda w: w.astype(jnp.float32), frozen))),
                                x16.astype(jnp.float32)).sum())(trainable)
    assert_trees_close(grads, ref, rtol=5e-2, atol=5e-2)


def test_paths_render_alike_for_nnx_state():
    fn, state, x = make_case("nnx")
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, state, x)
    names = [r.path for r in lorax.explain(fn, lp, x).rows]
    assert names == ["down/kernel", "heads/kernel", "up/kernel"]
    heads = lp["heads"]["kernel"].get_value()  # einsum kernel [i, h, d]: a holds i
    assert (heads.a.shape, heads.b.shape) == ((16, 2), (2, 2, 4))


# ------------------------------------------------------------------------------ bad input


def test_targets_matching_nothing_lists_candidates():
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match=r"matched no weight(.|\n)*params/Dense_0/kernel \(10, 16\)"):
        lorax.init(KEY, lorax.LoraConfig(targets=r".*nothing.*"), fn, params, x)


def test_target_that_is_not_a_matmul_weight_is_refused():
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match=r"'params/Dense_0/bias' \(shape \(16,\)\) is not used"):
        lorax.init(KEY, lorax.LoraConfig(targets=r".*Dense_0/.*"), fn, params, x)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank for 'rank' must be a positive int, got 0"),
    (dict(rank=2.5), TypeError, "must be a positive int, got 2.5"),
    (dict(alpha=0.0), ValueError, "alpha for 'alpha' must be > 0"),
    (dict(alpha_pattern={"x": -1.0}), ValueError, "alpha for 'x' must be > 0"),
    (dict(targets="(unclosed"), ValueError, r"LoraConfig.targets: '\(unclosed' is not a valid regex"),
    (dict(exclude=["[bad"]), ValueError, "LoraConfig.exclude"),
    (dict(dropout=1.0), ValueError, "dropout must be in"),
    (dict(init="zeros"), ValueError, "init must be"),
    (dict(use_dora="yes"), TypeError, "use_dora must be True or False"),
])
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        lorax.LoraConfig(**kwargs)


def test_rank_larger_than_weight_is_refused_with_path_and_shape():
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match=r"rank 9 for 'params/Dense_2/kernel' \(shape \(32, 8\)\) "
                                         r"exceeds min\(in, out\) = min\(32, 8\)"):
        lorax.init(KEY, lorax.LoraConfig(rank=9), fn, params, x)


def test_init_refuses_a_tree_that_is_already_adapted():
    fn, params, x = make_case("mlp")
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x)
    with pytest.raises(ValueError, match="already hold LoRA nodes"):
        lorax.init(KEY, lorax.LoraConfig(rank=2), fn, lp, x)


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
