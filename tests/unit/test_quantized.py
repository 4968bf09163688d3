"""Quantized bases (QLoRA): each format against its dequantized model, frozen codes, the compiled
step's argument bytes, and the errors."""

import dataclasses
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import with_random_b

import lorax

FORMATS = ["nf4", "int8", "q4_0", "q4_1", "q8_0"]


def fn(p, x):
    """Plain weights: an input projection, two scanned layers, a head."""
    def layer(h, w):
        return jnp.tanh(h @ w["up"]) @ w["down"], None

    h, _ = jax.lax.scan(layer, x @ p["inp"], p["layers"])
    return h @ p["head"]


def make_params(d=64, hidden=128):
    k = jax.random.split(jax.random.key(0), 4)
    return {"inp": jax.random.normal(k[0], (32, d)) / 4,
            "layers": {"up": jax.random.normal(k[1], (2, d, hidden)) / 8,
                       "down": jax.random.normal(k[2], (2, hidden, d)) / 8},
            "head": jax.random.normal(k[3], (d, 8)) / 8}


X = jax.random.normal(jax.random.key(1), (4, 32))


@functools.cache
def quantized(fmt, double_quant=False):
    return lorax.quantize(make_params(), fmt, double_quant=double_quant)


def adapted(fmt, **kw):
    """The quantized tree with adapters on ``up`` (made non-zero); the rest frozen quantized."""
    q = quantized(fmt, **kw)
    lp = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=4, targets=r".*up"), fn, q, X)
    up = lp["layers"]["up"]
    lp["layers"]["up"] = up.replace(b=jax.random.normal(jax.random.key(3), up.b.shape) * 0.1)
    return lp


@pytest.mark.parametrize("fmt,kw", [(f, {}) for f in FORMATS] + [("nf4", {"double_quant": True})])
def test_outputs_and_adapter_gradients_match_the_dequantized_model(fmt, kw, trees_close):
    lp = adapted(fmt, **kw)
    assert isinstance(lp["layers"]["up"].w, lorax.QuantizedArray) and isinstance(lp["head"], lorax.QuantizedArray)
    trees_close(jax.jit(lorax.lora(fn))(lp, X), jax.jit(lambda p: fn(lorax.merge(p), X))(lp))
    trainable, frozen = lorax.split(lp)
    loss = lambda f: lambda t: jnp.sum(f(lorax.combine(t, frozen)) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda p: lorax.lora(fn)(p, X))))(trainable)
    want = jax.jit(jax.grad(loss(lambda p: fn(lorax.merge(p), X))))(trainable)
    trees_close(got, want, atol=1e-5)
    assert float(jnp.abs(got["layers"]["up"].a).max()) > 0


def test_dora_over_a_quantized_base(trees_close):
    q = quantized("nf4")
    lp = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=4, targets=r".*up", use_dora=True), fn, q, X)
    up = lp["layers"]["up"]
    lp["layers"]["up"] = up.replace(b=up.b + 0.1)
    trees_close(lorax.lora(fn)(lp, X), fn(lorax.merge(lp), X))


def test_formats_round_trip_within_their_precision():
    w = jax.random.normal(jax.random.key(0), (256, 128))
    worst = {"nf4": 0.13, "q4_0": 0.15, "q4_1": 0.1, "int8": 0.01, "q8_0": 0.01}
    for fmt, bound in worst.items():
        q = lorax.quantize({"w": w}, fmt)["w"]
        err = float(jnp.linalg.norm(q.dequantize() - w) / jnp.linalg.norm(w))
        assert 0 < err < bound, (fmt, err)
    nf4 = lorax.quantize({"w": w}, "nf4")["w"]
    assert nf4.codes.dtype == jnp.uint8 and nf4.codes.shape == (256, 64) and nf4.scale.shape == (256, 2)
    levels = np.asarray(nf4.dequantize()[0, :64] / nf4.scale[0, 0])
    assert np.abs(levels[:, None] - lorax._src.bases.formats.NF4[None]).min(axis=1).max() < 1e-6


def test_views_and_scan_slices_keep_the_codes():
    """Inside the scan the layers' codes are sliced, not a dequantized stack; explain says how."""
    lp = adapted("nf4")
    jaxpr = jax.make_jaxpr(lorax.lora(fn))(lp, X).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    stacked = [v.aval for v in scan.invars if v.aval.dtype == jnp.uint8]
    assert {a.shape for a in stacked} == {(2, 64, 64), (2, 128, 32)}
    assert not any(v.aval.shape in ((2, 64, 128), (2, 128, 64)) for v in scan.invars)
    rows = {r.path: r for r in lorax.explain(fn, lp, X).rows}
    assert rows["layers/up"].how == "factored (dot_general) over nf4"
    assert rows["layers/down"].how == "dequantized per use (dot_general)" and rows["head"].kind == "frozen nf4"
    t = lorax.quantize({"w": jnp.arange(6.0 * 64).reshape(6, 64)}, "nf4")["w"]
    view = lambda p, x: x @ p["w"].T.astype(jnp.float32)  # noqa: E731
    np.testing.assert_allclose(lorax.lora(view)({"w": t}, jnp.ones((1, 64))),
                               jnp.ones((1, 64)) @ t.dequantize().T, rtol=1e-6)


def test_block_size_that_does_not_divide_the_axis_is_refused():
    params = {"w": jnp.ones((10, 48))}
    with pytest.raises(ValueError, match=r"'w' \(shape \(10, 48\)\).*block size 64 does not divide axis -1 of "
                                         r"length 48"):
        lorax.quantize(params, "nf4", axis=-1)
    assert isinstance(params["w"], jax.Array)


def test_quantized_leaf_cannot_be_trained_fully():
    q = quantized("nf4")
    config = lorax.LoraConfig(rank=4, targets=r".*up", trainable=r"head")
    with pytest.raises(ValueError, match=r"'head' \(shape \(64, 8\)\) is a quantized weight \(nf4\).*frozen"):
        lorax.init(jax.random.key(0), config, fn, q, X)
    with pytest.raises(ValueError, match=r"'head' \(shape \(64, 8\)\) is marked Trainable"):
        lorax.quantize({**make_params(), "head": lorax.Trainable(jnp.ones((64, 8)))}, "nf4")
    with pytest.raises(ValueError, match=r"'head'.*quantized weight marked Trainable"):
        lorax.lora(fn)({**q, "head": lorax.Trainable(q["head"])}, X)
    with pytest.raises(ValueError, match=r"'layers/up'.*quantized.*pissa"):
        lorax.init(jax.random.key(0), lorax.LoraConfig(rank=4, targets=r".*up", init="pissa"), fn, q, X)


def train(lp, steps=3):
    tx = lorax.optimizer(optax.adam(1e-2))
    trainable, frozen = lorax.split(lp)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state, frozen, x):
        loss_of = lambda t: jnp.mean(lorax.lora(fn)(lorax.combine(t, frozen), x) ** 2)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_of)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    for _ in range(steps):
        trainable, state, _ = step(trainable, state, frozen, X)
    return step, (trainable, state, frozen, X), lorax.combine(trainable, frozen)


def test_frozen_codes_bit_identical_after_training_and_no_optimizer_state():
    lp = adapted("q4_1")
    _, _, after = train(lp)
    before_leaves = jax.tree.leaves(lorax.split(lp)[1])
    after_leaves = jax.tree.leaves(lorax.split(after)[1])
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(before_leaves, after_leaves))
    assert not np.array_equal(after["layers"]["up"].b, lp["layers"]["up"].b)
    state = lorax.optimizer(optax.adam(1e-2)).init(lp)  # the whole tree: state for a and b alone
    assert sum(x.size for x in jax.tree.leaves(state)) == 1 + 2 * lp["layers"]["up"].num_adapter_params()


@pytest.mark.parametrize("fmt,limit", [("nf4", 4.6), ("q4_1", 5.1)])
def test_compiled_step_takes_the_codes_alone(fmt, limit):
    """XLA's argument bytes of the step, less the adapters, optimizer state and batch, over the
    base's parameter count: the base enters the step in its codes, never in fp32."""
    q = lorax.quantize(make_params(d=256, hidden=512), fmt, targets=r"layers/.*")
    lp = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=4, targets=r".*up"), fn, q, X)
    step, args, _ = train(lp, steps=0)
    trainable, state, frozen, x = args
    compiled = step.lower(*args).compile()
    other = sum(a.nbytes for a in jax.tree.leaves((trainable, state, x, frozen["inp"], frozen["head"])))
    base_bytes = compiled.memory_analysis().argument_size_in_bytes - other
    base_params = lp["layers"]["up"].w.size + lp["layers"]["down"].size
    assert base_bytes == sum(a.nbytes for a in jax.tree.leaves(frozen["layers"]))
    assert 8 * base_bytes / base_params <= limit


def test_checkpoint_round_trip_over_a_quantized_base(trees_close):
    _, _, lp = train(adapted("nf4"), steps=2)
    base = quantized("nf4")
    folder = lorax.save(tempfile.mkdtemp(), lp)
    back = lorax.load(folder.parent, base)
    assert isinstance(back["layers"]["up"].w, lorax.QuantizedArray)
    trees_close(lorax.lora(fn)(back, X), lorax.lora(fn)(lp, X))


def test_merge_full_precision_or_requantized():
    lp = adapted("q4_1")
    merged = lorax.merge(lp)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
    tree, errors = lorax.merge_quantized(lp)
    assert tree["layers"]["up"].fmt == "q4_1" and isinstance(tree["head"], lorax.QuantizedArray)
    err = float(jnp.linalg.norm(tree["layers"]["up"].dequantize() - merged["layers"]["up"])
                / jnp.linalg.norm(merged["layers"]["up"]))
    assert list(errors) == ["layers/up"] and errors["layers/up"] == pytest.approx(err, rel=1e-4) and 0 < err < 0.1


def test_partition_specs_follow_the_weight_layout():
    from jax.sharding import PartitionSpec as P

    lp = adapted("nf4")
    specs = lorax.partition_specs(lp, {"inp": P(), "layers": {"up": P(None, None, "model"),
                                                            "down": P(None, "model", None)}, "head": P()})
    up, down = specs["layers"]["up"], specs["layers"]["down"]
    assert up.w.codes == up.w.scale == P(None, None, "model") and up.b == P(None, None, "model")
    assert isinstance(down, lorax.QuantizedArray) and down.codes == P(None, "model", None)
    assert jax.tree.structure(specs) == jax.tree.structure(jax.tree.map(lambda x: P(), lp))
    assert dataclasses.replace(up.w, codes=None).fmt == "nf4"


def test_a_view_that_rounds_values_sees_the_dequantized_weight():
    """A quantized base has no view of its own for reduce_precision (it rounds values, not
    codes): the view applies to the dequantized weight, as it would to that plain base."""
    base = lorax.quantize({"w": jax.random.normal(jax.random.key(3), (64, 32))}, "nf4")
    rounded = lambda p, x: x @ jax.lax.reduce_precision(p["w"], exponent_bits=5, mantissa_bits=2)  # noqa: E731
    x = jax.random.normal(jax.random.key(4), (2, 64))
    lp = with_random_b(lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), rounded, base, x))
    plain = {"w": lp["w"].replace(w=base["w"].dequantize())}
    assert jax.make_jaxpr(lorax.lora(rounded))(lp, x).eqns  # traced through the table, not refused
    np.testing.assert_allclose(lorax.lora(rounded)(lp, x), lorax.lora(rounded)(plain, x), rtol=1e-6)
    assert not np.allclose(lorax.lora(rounded)(lp, x), x @ base["w"].dequantize())  # the update is in it


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "nf4"])
def test_a_quantized_table_is_looked_up_in_its_codes_and_only_the_rows_are_dequantized(fmt):
    """An embedding lookup of whole rows gathers codes and scales: the same values as the
    dequantized table's lookup (an index out of range gives NaN rows alike), and the compiled
    lookup holds no fp32 copy of the table. Lookups across the blocks still dequantize it."""
    table = jax.random.normal(jax.random.key(0), (64, 128))
    rows = lorax.quantize({"t": table}, fmt, axis=-1)
    ids = jnp.array([[1, 5], [63, 70]])
    take = lambda p, ids: jnp.take(p["t"], ids, axis=0)  # noqa: E731
    got, want = lorax.lora(take)(rows, ids), take({"t": rows["t"].dequantize()}, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.isnan(np.asarray(got[1, 1])).all() and not np.isnan(np.asarray(got[0])).any()
    assert "f32[64,128]" not in jax.jit(lorax.lora(take)).lower(rows, ids).compile().as_text()
    columns = lambda p, ids: jnp.take(p["t"], ids, axis=1)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(lorax.lora(columns)(rows, ids[0])),
                                  np.asarray(columns({"t": rows["t"].dequantize()}, ids[0])))
