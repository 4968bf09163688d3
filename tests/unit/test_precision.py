"""Frozen bf16 weights inside `lorax.lora`: the backward stays bf16, matches the merged model's
to bf16 precision, and makes no fp32 copy of a frozen weight in the compiled program."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import lorax
from lorax._src.bases.precision import narrow_dot
from lorax._src.tracing.rules.products import dot_subscripts

BF16, F32 = jnp.bfloat16, jnp.float32


def mm(x, w, dims=(((1,), (0,)), ((), ()))):
    """The example LLaMA's bf16 product: bf16 operands, fp32 accumulation and output."""
    return jax.lax.dot_general(x.astype(BF16), w.astype(BF16), dims, preferred_element_type=F32)


def model(p, x):
    """Two bf16 matrices: ``up`` (adapted in the tests) and ``down`` (a plain frozen leaf)."""
    return mm(jnp.tanh(mm(x, p["up"])), p["down"])


def weights(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"up": (jax.random.normal(k1, (48, 40)) / 7).astype(BF16),
            "down": (jax.random.normal(k2, (40, 24)) / 6).astype(BF16)}


X = jax.random.normal(jax.random.key(9), (16, 48))


def adapted():
    params = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up"), model, weights(), X)
    # a trained-looking b, so the adapter's gradients and effect are not trivially zero
    up = params["up"]
    return {**params, "up": up.replace(b=jax.random.normal(jax.random.key(3), up.b.shape) / 5)}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dims,x_shape,w_shape", [
    ((((1,), (0,)), ((), ())), (6, 8), (8, 5)),          # x·W
    ((((0,), (1,)), ((), ())), (8, 5), (6, 8)),          # W on the left: Wᵀ·x
    ((((1,), (1,)), ((), ())), (6, 8), (5, 8)),          # a tied head x·Eᵀ
    ((((2,), (1,)), ((0,), (0,))), (3, 6, 8), (3, 8, 5)),  # batched (stacked layers)
])
def test_narrow_dot_is_the_product_and_its_gradients_round_only_the_cotangent(dims, x_shape, w_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape).astype(BF16), jax.random.normal(kw, w_shape).astype(BF16)
    subs = tuple("".join(s) for s in dot_subscripts(dims, len(x_shape), len(w_shape)))
    out = narrow_dot(x, w, subs, None, F32)
    exact = jax.lax.dot_general(x, w, dims, preferred_element_type=F32)
    np.testing.assert_array_equal(out, exact)
    g = jax.random.normal(kg, out.shape)
    _, vjp = jax.vjp(lambda x, w: narrow_dot(x, w, subs, None, F32), x, w)
    dx, dw = vjp(g)
    assert dx.dtype == BF16 and dw.dtype == BF16
    # JAX's own backward in fp32 (f32 cotangent, operands upcast): ours differs by bf16 rounding
    _, ref_vjp = jax.vjp(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=F32),
                         x.astype(F32), w.astype(F32))
    rx, rw = ref_vjp(g)
    assert rel(dx, rx) < 1e-2 and rel(dw, rw) < 1e-2
    # and it is JAX's backward of the bf16-rounded cotangent, rounded to bf16
    for got, want in zip((dx, dw), ref_vjp(g.astype(BF16).astype(F32))):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(BF16), np.float32),
                                   rtol=1e-2, atol=1e-3)


def test_narrow_dot_of_an_fp32_operand_casts_it_and_returns_its_gradient_unrounded():
    """An fp32 operand is multiplied as its bf16 cast; its gradient is the bf16 product of the
    rounded cotangent, accumulated and returned in fp32 (not rounded to bf16 on its way)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (6, 8)), jax.random.normal(kw, (8, 5)).astype(BF16)
    dims = (((1,), (0,)), ((), ()))
    f = lambda x: narrow_dot(x, w, ("ij", "jk", "ik"), None, F32)  # noqa: E731
    np.testing.assert_array_equal(f(x), jax.lax.dot_general(x.astype(BF16), w, dims, preferred_element_type=F32))
    g = jax.random.normal(kg, (6, 5))
    dx = jax.vjp(f, x)[1](g)[0]
    want = jax.lax.dot_general(g.astype(BF16), w, (((1,), (1,)), ((), ())), preferred_element_type=F32)
    assert dx.dtype == F32
    np.testing.assert_array_equal(dx, want)
    assert np.any(np.asarray(dx) != np.asarray(dx.astype(BF16).astype(F32)))  # not rounded to bf16


def test_an_fp32_activation_cast_to_bf16_for_a_frozen_product_gets_its_gradient_in_fp32():
    """The example model casts its fp32 activations to bf16 where it multiplies them. Through a
    frozen bf16 weight (``down``) and an adapted one (``up``), the gradient reaching the fp32
    input is nearer JAX's fp32 backward of the merged model than JAX's own bf16 rules make it
    (which round it to bf16 at each product), and is not made of bf16 values."""
    params = adapted()
    merged32 = jax.tree.map(lambda w: w.astype(F32), lorax.merge(params))
    dx = lambda narrow: jax.grad(  # noqa: E731
        lambda x: jnp.mean(lorax.lora(model, low_precision_backward=narrow)(params, x) ** 2))(X)
    model32 = lambda p, x: jnp.tanh(x @ p["up"]) @ p["down"]  # noqa: E731
    ref = jax.grad(lambda x: jnp.mean(model32(merged32, x) ** 2))(X)
    got, jax_own = dx(True), dx(False)
    assert got.dtype == F32 and np.any(np.asarray(got) != np.asarray(got.astype(BF16).astype(F32)))
    assert rel(got, ref) < 1e-2 and rel(got, ref) < rel(jax_own, ref)


def loss_of(fn, params):
    return jnp.mean(fn(params, X) ** 2)


@pytest.mark.parametrize("narrow", [True, False])
def test_adapter_gradients_over_a_bf16_base_match_the_merged_model(narrow):
    params = adapted()
    trained, frozen = lorax.split(params)
    lossf = lambda t: loss_of(lorax.lora(model, low_precision_backward=narrow), lorax.combine(t, frozen))  # noqa: E731
    got = jax.grad(lossf)(trained)
    # reference: the merged model in fp32, differentiated by JAX through the merge
    up = params["up"]
    ref_model = lambda a, b: loss_of(  # noqa: E731
        model, {"up": up.w.astype(F32) + up.scale * a @ b, "down": params["down"].astype(F32)})
    ra, rb = jax.grad(ref_model, argnums=(0, 1))(up.a, up.b)
    assert got["up"].a.dtype == F32 and got["up"].b.dtype == F32
    assert rel(got["up"].a, ra) < 2e-2 and rel(got["up"].b, rb) < 2e-2
    assert float(jnp.abs(ra).max()) > 1e-4  # a gradient that could be wrong


def test_bf16_backward_makes_no_fp32_copy_of_a_frozen_weight():
    """The compiled step: with JAX's own backward, XLA converts each frozen bf16 weight to fp32
    (f32[48,40] and f32[40,24] appear); with lorax's, neither does."""
    params = adapted()
    trained, frozen = lorax.split(params)

    def hlo(narrow):
        lossf = lambda t: loss_of(lorax.lora(model, low_precision_backward=narrow), lorax.combine(t, frozen))  # noqa: E731
        text = jax.jit(jax.grad(lossf)).lower(trained).compile().as_text()
        return {shape: len(re.findall(rf"f32\[{shape}\]", text)) for shape in ("48,40", "40,24")}

    assert hlo(False) != {"48,40": 0, "40,24": 0}
    assert hlo(True) == {"48,40": 0, "40,24": 0}
    # nor does the traced backward compute a gradient for either frozen weight (left for XLA to drop)
    lossf = lambda t: loss_of(lorax.lora(model), lorax.combine(t, frozen))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(lossf))(trained))
    assert not re.search(r"(f32|bf16)\[(48,40|40,24)\] = (dot_general|custom_vjp)", jaxpr)
    assert re.search(r"f32\[16,40\] = custom_vjp_call", jaxpr)


def test_a_quantized_base_multiplied_in_bf16_takes_the_bf16_backward():
    """QLoRA with bf16 products (the base's blocks dequantized and cast to bf16 where used):
    the adapter's gradients match the merged model's to bf16 precision, and the compiled step
    makes no fp32 copy of the frozen quantized ``down`` (JAX's own backward makes several)."""
    dense = {"up": jax.random.normal(jax.random.key(4), (64, 40)) / 8,
             "down": jax.random.normal(jax.random.key(5), (40, 64)) / 6}
    x = jax.random.normal(jax.random.key(9), (16, 64))
    params = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up"), model,
                        lorax.quantize(dense, "q4_1", targets=".*"), x)
    up = params["up"].replace(b=jax.random.normal(jax.random.key(3), params["up"].b.shape) / 5)
    params = {**params, "up": up}
    trained, frozen = lorax.split(params)
    loss = lambda narrow: lambda t: jnp.mean(  # noqa: E731
        lorax.lora(model, low_precision_backward=narrow)(lorax.combine(t, frozen), x) ** 2)
    got = jax.grad(loss(True))(trained)["up"]
    w_up, w_down = up.w.dequantize(), params["down"].dequantize()
    ref = lambda a, b: jnp.mean(model({"up": w_up + up.scale * a @ b, "down": w_down}, x) ** 2)  # noqa: E731
    ra, rb = jax.grad(ref, argnums=(0, 1))(up.a, up.b)
    assert rel(got.a, ra) < 2e-2 and rel(got.b, rb) < 2e-2 and float(jnp.abs(ra).max()) > 1e-4
    copies = lambda narrow: len(re.findall(r"f32\[40,64\]", jax.jit(jax.grad(loss(narrow))).lower(trained)  # noqa: E731
                                           .compile().as_text()))
    assert copies(False) > 0 and copies(True) == 0


def test_a_remat_policy_that_saves_dots_saves_the_bf16_frozen_products_too():
    """Under ``jax.checkpoint(policy=dots_with_no_batch_dims_saveable)`` the backward keeps the
    frozen bf16 product of ``up`` (f32[16,40]) as it keeps the adapter's own f32[16,40] term,
    rather than recomputing it; with no policy it keeps neither."""
    trained, frozen = lorax.split(adapted())

    def saved(policy):
        fn = lambda t: loss_of(lorax.lora(jax.checkpoint(model, policy=policy)), lorax.combine(t, frozen))  # noqa: E731
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(fn, trained)
        return re.findall(r"f32\[16,40\] output of dot_general", printed.getvalue())

    assert len(saved(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)) == 2
    assert saved(None) == []


def test_a_plain_bf16_leaf_still_has_its_gradient():
    """A plain bf16 matrix is frozen by lorax's contract, but differentiating it still works:
    the gradient JAX computes, to bf16 precision."""
    params = adapted()
    got = jax.grad(lambda d: loss_of(lorax.lora(model), {**params, "down": d}))(params["down"])
    merged = lorax.merge(params)
    ref = jax.grad(lambda d: loss_of(model, {**merged, "down": d.astype(BF16)}))(params["down"].astype(F32))
    assert got.dtype == BF16 and rel(got, ref) < 2e-2


def test_fp32_weights_and_forward_mode_keep_jax_own_rules():
    model32 = lambda p, x: jnp.tanh(x @ p["up"]) @ p["down"]  # noqa: E731
    params32 = jax.tree.map(lambda x: x.astype(F32), weights())
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up"), model32, params32, X)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_of(lorax.lora(model32), p)))(lp))
    assert "custom_vjp" not in jaxpr and "dot_general" in jaxpr
    params = adapted()
    tangent = jnp.ones_like(X)
    with pytest.raises(TypeError, match="forward-mode.*low_precision_backward=False"):
        jax.jvp(lambda x: lorax.lora(model)(params, x), (X,), (tangent,))
    out, dout = jax.jvp(lambda x: lorax.lora(model, low_precision_backward=False)(params, x), (X,), (tangent,))
    ref_out, ref_dout = jax.jvp(lambda x: model(lorax.merge(params), x), (X,), (tangent,))
    assert rel(out, ref_out) < 1e-2 and rel(dout, ref_dout) < 2e-2


def test_fp16_bases_keep_jax_backward_whose_cotangents_would_underflow_in_fp16():
    """The mean loss over 1024 tokens x 16k classes puts per-logit cotangents near fp16's smallest
    subnormal: rounded to fp16 before the frozen head, the gradient reaching the adapter below it
    drifts 1.7% from the reference. fp16 products keep JAX's backward (0.05% here)."""
    tokens, width, classes = 1024, 32, 16384
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    weights16 = {"up": (jax.random.normal(k4, (width, width)) / np.sqrt(width)).astype(jnp.float16),
                 "head": (jax.random.normal(k1, (width, classes)) / np.sqrt(width)).astype(jnp.float16)}
    x = jax.random.normal(k2, (tokens, width)).astype(jnp.float16)
    labels = jax.random.randint(k3, (tokens,), 0, classes)
    mm16 = lambda a, b: jax.lax.dot_general(a.astype(b.dtype), b, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    net = lambda p, x: mm16(jnp.tanh(mm16(x, p["up"])), p["head"])
    loss = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    params = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up"), net, weights16, x)
    params = {**params, "up": params["up"].replace(b=jax.random.normal(jax.random.key(4), params["up"].b.shape) / 10)}
    trainable, frozen = lorax.split(params)
    of = lambda t: loss(lorax.lora(net)(lorax.combine(t, frozen), x))
    assert "custom_vjp" not in str(jax.make_jaxpr(jax.grad(of))(trainable))
    as32 = lambda tree: jax.tree.map(lambda v: v.astype(F32), tree)
    reference = lambda t: loss(net(as32(lorax.merge(lorax.combine(t, frozen))), x.astype(F32)))
    got, ref = jax.grad(of)(trainable)["up"], jax.grad(reference)(trainable)["up"]
    assert rel(got.a, ref.a) < 5e-3 and rel(got.b, ref.b) < 5e-3


@pytest.mark.parametrize("value", ["False", 0, None, 1.0])
def test_low_precision_backward_takes_only_a_bool(value):
    with pytest.raises(TypeError, match="low_precision_backward must be True or False"):
        lorax.lora(model, low_precision_backward=value)
    assert lorax.lora(model, low_precision_backward=np.bool_(False))


def test_lora_refuses_a_non_callable_and_a_non_key_rng():
    with pytest.raises(TypeError, match="fn must be callable"):
        lorax.lora({"w": 1})
    with pytest.raises(TypeError, match="rng must be a PRNG key"):
        lorax.lora(model, rng=3)


def scanned(p, x):
    """Three layers in a ``scan`` over stacked bf16 weights: ``up`` (adapted) and ``down`` (plain)."""
    def layer(h, w):
        return mm(jnp.tanh(mm(h, w["up"])), w["down"]), None
    return jax.lax.scan(layer, x, p)[0]


def stacked_weights():
    k1, k2 = jax.random.split(jax.random.key(4))
    return {"up": (jax.random.normal(k1, (3, 48, 40)) / 7).astype(BF16),
            "down": (jax.random.normal(k2, (3, 40, 48)) / 6).astype(BF16)}


def stacked_adapted():
    params = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up"), scanned, stacked_weights(), X)
    up = params["up"]
    return {**params, "up": up.replace(b=jax.random.normal(jax.random.key(3), up.b.shape) / 5)}


def test_a_scanned_bf16_stack_is_sliced_as_bits_with_no_fp32_copy_and_the_same_gradients():
    """XLA:CPU slices a bf16 stack inside a loop from an fp32 copy of the whole stack, made
    before the loop; lorax scans the bits of frozen bf16 stacks, so neither stack is ever fp32,
    and the adapter's gradients are those of the merged model."""
    params = stacked_adapted()
    trained, frozen = lorax.split(params)

    def compiled(narrow):
        lossf = lambda t: loss_of(lorax.lora(scanned, low_precision_backward=narrow), lorax.combine(t, frozen))  # noqa: E731
        return jax.jit(jax.grad(lossf)).lower(trained).compile().as_text(), jax.grad(lossf)(trained)

    stacks = r"f32\[3,(48,40|40,48)\]"
    text, got = compiled(True)
    assert re.search(stacks, compiled(False)[0]) and not re.search(stacks, text)
    assert "u16[3,48,40]" in text and "u16[3,40,48]" in text
    up = params["up"]
    ref = lambda a, b: loss_of(scanned, {"up": up.w.astype(F32) + up.scale * a @ b,  # noqa: E731
                                         "down": params["down"].astype(F32)})
    ra, rb = jax.grad(ref, argnums=(0, 1))(up.a, up.b)
    assert rel(got["up"].a, ra) < 2e-2 and rel(got["up"].b, rb) < 2e-2 and float(jnp.abs(rb).max()) > 1e-4
    np.testing.assert_allclose(lorax.lora(scanned)(params, X), scanned(lorax.merge(params), X), rtol=2e-2, atol=2e-2)


def test_a_differentiated_bf16_stack_in_a_scan_keeps_its_gradient_or_says_how():
    """A plain bf16 stack differentiated as ``lora`` runs stays bf16 and gets its gradient; one
    differentiated afterwards, through a jitted ``lora`` function, would find bits: refused with
    the fix named, and the fix works."""
    params = stacked_adapted()
    merged = lorax.merge(params)
    ref = jax.grad(lambda d: loss_of(scanned, {**merged, "down": d.astype(BF16)}))(params["down"].astype(F32))
    got = jax.grad(lambda d: loss_of(lorax.lora(scanned), {**params, "down": d}))(params["down"])
    assert got.dtype == BF16 and rel(got, ref) < 2e-2
    jitted = jax.jit(lambda p: loss_of(lorax.lora(scanned), p))
    with pytest.raises(Exception, match=r"frozen bf16 stack \(3, 40, 48\).*low_precision_backward=False"):
        jax.grad(lambda d: jitted({**params, "down": d}))(params["down"])
    wide = jax.jit(lambda p: loss_of(lorax.lora(scanned, low_precision_backward=False), p))
    assert rel(jax.grad(lambda d: wide({**params, "down": d}))(params["down"]), ref) < 2e-2
