"""lora(fn) must equal the materialized reference fn(merge(params)), outputs and gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, KEY, assert_trees_close, make_case, with_random_b

import lorax

TOL = {"gpt-bf16": dict(rtol=5e-2, atol=5e-2)}


def _adapted(name, **config):
    fn, params, x = make_case(name)
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, alpha=4.0, **config), fn, params, x)
    return fn, params, with_random_b(lp), x


@pytest.mark.parametrize("name", CASES)
def test_b_zero_at_init_gives_fn_exactly(name):
    fn, params, x = make_case(name)
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x)
    np.testing.assert_array_equal(lorax.lora(fn)(lp, x), fn(params, x))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_outputs_and_adapter_gradients_match_merged_reference(name, jit):
    fn, _, lp, x = _adapted(name)
    trainable, frozen = lorax.split(lp)
    wrap = eqx.filter_jit if jit else (lambda f: f)  # equinox modules hold callables

    def loss_lora(t):
        return jnp.sum(jnp.square(lorax.lora(fn)(lorax.combine(t, frozen), x).astype(jnp.float32)))

    def loss_ref(t):
        return jnp.sum(jnp.square(fn(lorax.merge(lorax.combine(t, frozen)), x).astype(jnp.float32)))

    tol = TOL.get(name, dict(rtol=2e-4, atol=2e-5))
    out = wrap(lorax.lora(fn))(lp, x)
    ref = fn(lorax.merge(lp), x)
    assert out.dtype == ref.dtype
    assert_trees_close(out, ref, **tol)
    g, g_ref = wrap(jax.grad(loss_lora))(trainable), jax.grad(loss_ref)(trainable)
    assert jax.tree.structure(g) == jax.tree.structure(trainable)
    # gradients must be non-trivial for the comparison to mean something
    assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g_ref)) > 1e-3
    assert_trees_close(g, g_ref, **(tol if name == "gpt-bf16" else dict(rtol=1e-3, atol=1e-5)))


@pytest.mark.parametrize("name", ["mlp", "conv", "gpt", "nnx", "plain", "equinox"])
def test_every_adapted_use_is_factored(name):
    fn, _, lp, x = _adapted(name)
    report = lorax.explain(fn, lp, x)
    assert report.rows and not report.materialized, str(report)


def test_bf16_compute_keeps_base_dtype_and_runs_adapters_in_bf16():
    fn, _, lp, x = _adapted("gpt-bf16")
    assert lorax.lora(fn)(lp, x).dtype == jnp.bfloat16
    text = str(jax.make_jaxpr(lorax.lora(fn))(lp, x))
    # the rank-2 intermediates x·A, [batch 2 × seq 8 rows, r 2], stay in the compute dtype
    assert "bf16[16,2]" in text and "f32[16,2]" not in text


def test_tied_embedding_targeted_explicitly_factors_lookup_and_head():
    fn, _, lp, x = _adapted("gpt", targets=r".*wte/embedding")
    lw = lp["params"]["wte"]["embedding"]
    assert (lw.a.shape, lw.b.shape) == ((64, 2), (2, 32))
    report = lorax.explain(fn, lp, x)
    assert report.rows[0].how == "factored (dot_general, gather)"
    assert_trees_close(lorax.lora(fn)(lp, x), fn(lorax.merge(lp), x), rtol=2e-4, atol=2e-5)


def test_all_linear_skips_embedding_and_tied_head():
    fn, _, lp, x = _adapted("gpt")
    names = [r.path for r in lorax.explain(fn, lp, x).rows]
    assert names == [f"params/h/{n}/kernel" for n in ("fc", "key", "out", "proj", "query", "value")]


def test_multi_axis_kernels_factor_contracted_axes_into_a():
    _, _, lp, _ = _adapted("gpt")
    h = lp["params"]["h"]
    q, out = h["query"]["kernel"], h["out"]["kernel"]
    # query kernel [layers, embed, heads, head_dim]: a holds embed, b holds heads x head_dim
    assert (q.stack_axes, q.a_axes, q.b_axes) == ((0,), (1,), (2, 3))
    assert (q.a.shape, q.b.shape) == ((2, 32, 2), (2, 2, 4, 8))
    # out kernel [layers, heads, head_dim, embed]: a holds heads x head_dim
    assert (out.stack_axes, out.a_axes, out.b_axes) == ((0,), (1, 2), (3,))
    assert (out.a.shape, out.b.shape) == ((2, 4, 8, 2), (2, 2, 32))


def test_conv_factors_are_window_conv_and_1x1():
    _, _, lp, _ = _adapted("conv")
    k = lp["params"]["Conv_0"]["kernel"]  # HWIO [3, 3, 3, 8]
    assert (k.a.shape, k.b.shape) == ((3, 3, 3, 2), (2, 8))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_save_no_copy_of_frozen_weights(remat):
    """Stopping W's gradient inside a scan body made JAX save every layer's W as a
    residual: a stacked copy of the frozen weights, written each step."""
    from models import GPT

    model, x = GPT(remat=remat, vocab=16), jax.random.randint(KEY, (2, 8), 0, 16)
    fn = lambda p, x: model.apply(p, x)  # noqa: E731
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, model.init(KEY, x), x)
    trainable, frozen = lorax.split(lp)
    stacked = {lw.w.shape for lw in jax.tree.leaves(lp, is_leaf=lambda v: isinstance(v, lorax.LoraWeight))
               if isinstance(lw, lorax.LoraWeight)}
    loss = lambda t: jnp.sum(lorax.lora(fn)(lorax.combine(t, frozen), x))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
    made = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars
            if eqn.primitive.name != "stop_gradient"}  # the one at entry is a no-op
    assert stacked and not stacked & made


def test_composition_jit_grad_vmap():
    fn, _, lp, x = _adapted("mlp")
    trainable, frozen = lorax.split(lp)
    xs = jnp.stack([x, 2 * x])

    def per_example(t, x):
        return jnp.sum(lorax.lora(fn)(lorax.combine(t, frozen), x))

    def ref(t, x):
        return jnp.sum(fn(lorax.merge(lorax.combine(t, frozen)), x))

    g = jax.jit(jax.grad(lambda t: jax.vmap(per_example, (None, 0))(t, xs).sum()))(trainable)
    g_ref = jax.grad(lambda t: jax.vmap(ref, (None, 0))(t, xs).sum())(trainable)
    assert_trees_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_second_call_does_not_retrace():
    fn, _, lp, x = _adapted("mlp")
    traces = []

    def counted(p, x):
        traces.append(1)
        return fn(p, x)

    step = jax.jit(lorax.lora(counted))
    step(lp, x)
    n = len(traces)
    step(lp, x + 1)
    assert len(traces) == n


def test_dropout_needs_a_key_and_is_off_without_one():
    fn, params, x = make_case("mlp")
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2, dropout=0.5), fn, params, x))
    ref = fn(lorax.merge(lp), x)
    assert_trees_close(lorax.lora(fn)(lp, x), ref, rtol=1e-5, atol=1e-6)
    dropped = lorax.lora(fn, rng=jax.random.key(1))(lp, x)
    assert float(jnp.abs(dropped - ref).max()) > 1e-3
    again = lorax.lora(fn, rng=jax.random.key(1))(lp, x)
    np.testing.assert_array_equal(dropped, again)


def test_materialized_fallback_is_correct_and_reported():
    def fn(p, x):  # weight decay inside the function: an elementwise use of W
        return jnp.sum(x @ p["w"]) + 0.1 * jnp.sum(p["w"] ** 2)

    params = {"w": jax.random.normal(KEY, (4, 3))}
    x = jnp.ones((2, 4))
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    assert_trees_close(lorax.lora(fn)(lp, x), fn(lorax.merge(lp), x), rtol=1e-5, atol=1e-5)
    assert lorax.explain(fn, lp, x).rows[0].how == "materialized: integer_pow"


def test_stacked_weights_indexed_in_a_python_loop():
    def fn(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["w"][i])
        return x

    params = {"w": jax.random.normal(KEY, (3, 5, 5)) / 2}
    x = jnp.ones((2, 5))
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    assert (lp["w"].stack_axes, lp["w"].a.shape, lp["w"].b.shape) == ((0,), (3, 5, 2), (3, 2, 5))
    assert_trees_close(lorax.lora(fn)(lp, x), fn(lorax.merge(lp), x), rtol=1e-5, atol=1e-5)
    assert lorax.explain(fn, lp, x).rows[0].how == "factored (dot_general)"


def test_custom_vjp_weight_use_materializes_and_matches():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    fn = lambda p, x: matmul(x, p["w"])  # noqa: E731
    params = {"w": jax.random.normal(KEY, (4, 3))}
    x = jnp.ones((2, 4))
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    assert_trees_close(lorax.lora(fn)(lp, x), fn(lorax.merge(lp), x), rtol=1e-5, atol=1e-5)
    assert lorax.explain(fn, lp, x).rows[0].how.startswith("materialized: custom_vjp")


def test_compiled_program_names_the_model_layers():
    """Equations lorax re-emits keep the model's name stack, so profiles and HLO of a
    `lora` program say which layer each product (base and low-rank) belongs to."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="q_proj")(nn.relu(nn.Dense(5, name="up")(x)))

    x = jnp.ones((2, 4))
    fn = lambda p, x: Net().apply(p, x)  # noqa: E731
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, targets="all-linear"), fn, Net().init(KEY, x), x)
    hlo = jax.jit(jax.grad(lambda p: lorax.lora(fn)(p, x).sum())).lower(lp).compile().as_text()
    for layer in ("q_proj", "up"):
        dots = [line for line in hlo.splitlines() if " dot(" in line and f"/{layer}/dot_general" in line]
        assert len(dots) >= 3, (layer, dots)  # x·W, x·A, (x·A)·B at least
