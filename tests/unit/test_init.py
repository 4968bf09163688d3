"""`lorax.init`: which weights it adapts and which it skips, how it initialises the factors and in
what dtype, and what it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, assert_trees_close, make_case, with_random_b
from helpers import QV_BASE as BASE
from helpers import QV_X as X
from helpers import qv_fn as fn

import lorax


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


def test_targets_matching_nothing_lists_candidates():
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match=r"matched no weight(.|\n)*params/Dense_0/kernel \(10, 16\)"):
        lorax.init(KEY, lorax.LoraConfig(targets=r".*nothing.*"), fn, params, x)


def test_target_that_is_not_a_matmul_weight_is_refused():
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match=r"'params/Dense_0/bias' \(shape \(16,\)\) is not used"):
        lorax.init(KEY, lorax.LoraConfig(targets=r".*Dense_0/.*"), fn, params, x)


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


def test_all_linear_skips_penzai_norm_and_int_weights_and_explain_says_so():
    def model(p, x):
        h = jnp.einsum("be,e->be", x, p["norm"]["scale"])  # penzai's RMSNorm
        h = h @ p["proj"]["kernel"] @ p["quant"]["kernel"].astype(jnp.float32)
        return h @ p["head"]

    params = {"norm": {"scale": jnp.ones(6)}, "proj": {"kernel": jnp.ones((6, 5))},
              "quant": {"kernel": jnp.ones((5, 5), jnp.int8)}, "head": jnp.ones(5)}
    lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=4), model, params, X)
    assert [type(lp[k]["kernel"] if k != "norm" else lp[k]["scale"]).__name__ for k in ("norm", "proj", "quant")] == \
        ["ArrayImpl", "LoraWeight", "ArrayImpl"]
    report = lorax.explain(model, lp, X)
    assert report.skipped == [("head", "its use leaves no output axis"),
                              ("norm/scale", "its use contracts no axis (an elementwise scale)"),
                              ("quant/kernel", "its dtype int8 is not floating")]
    assert "skipped quant/kernel: its dtype int8 is not floating" in str(report)
    with pytest.raises(ValueError, match=r"target 'quant/kernel' \(shape \(5, 5\)\) cannot take a low-rank "
                                         r"adapter: its dtype int8 is not floating"):
        lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2, targets="quant/kernel"), model, params, X)
    with pytest.raises(ValueError, match=r"target 'norm/scale' .* its use contracts no axis"):
        lorax.init(jax.random.key(0), lorax.LoraConfig(rank=1, targets="norm/.*"), model, params, X)


def test_init_refuses_a_config_that_is_not_a_lora_config():
    with pytest.raises(TypeError, match="config must be a lorax.LoraConfig, got dict"):
        lorax.init(jax.random.key(0), {"rank": 2}, fn, BASE, X)
