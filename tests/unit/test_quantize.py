"""`lorax.quantize`, `lorax.merge_quantized` and `QuantizedArray` refuse bad
input with an error naming the argument or the weight's path and shape, and leave the input as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax

FORMATS = ["nf4", "int8", "q4_0", "q4_1", "q8_0"]
W = jax.random.normal(jax.random.key(0), (64, 128))


def snapshot(tree):
    """The tree's structure, leaf objects and values, to compare after a call."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, leaves, [np.array(x) for x in leaves]


def assert_unchanged(tree, before):
    treedef, leaves, values = before
    now, now_def = jax.tree.leaves(tree), jax.tree.structure(tree)
    assert now_def == treedef and all(a is b for a, b in zip(now, leaves))
    assert all(np.array_equal(np.array(a), v, equal_nan=True) for a, v in zip(now, values))


def refused(params, error, match, *args, **kwargs):
    """``lorax.quantize(params, *args, **kwargs)`` raises ``error`` matching ``match``; ``params`` stay as they were."""
    before = snapshot(params)
    with pytest.raises(error, match=match):
        lorax.quantize(params, *args, **kwargs)
    assert_unchanged(params, before)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad,counts", [(np.nan, "1 NaN, 0 inf"), (-np.inf, "0 NaN, 1 inf")])
def test_non_finite_weights_are_refused(fmt, bad, counts):
    params = {"w": W.at[3, 5].set(bad), "ok": W}
    refused(params, ValueError, rf"'w' \(shape \(64, 128\)\): the weight holds NaN or inf \({counts}\)", fmt)


def test_non_finite_adapter_base_is_refused_with_its_path():
    lw = lorax.LoraWeight(W.astype(jnp.bfloat16).at[0, 0].set(jnp.inf), jnp.zeros((64, 2)), jnp.zeros((2, 128)))
    refused({"layer": {"kernel": lw}}, ValueError, r"'layer/kernel' \(shape \(64, 128\)\).*NaN or inf", "nf4")


def test_traced_weights_are_not_checked():
    """Under jit the values are unknown: quantize encodes what it is given."""
    q = jax.jit(lambda p: lorax.quantize(p, "q8_0"))({"w": W.at[0, 0].set(jnp.nan)})["w"]
    assert isinstance(q, lorax.QuantizedArray) and q.shape == (64, 128)


@pytest.mark.parametrize("fmt,limit,largest", [("q4_0", "524032", 6e5), ("q4_1", "65504", 7e4),
                                               ("q8_0", "8.31901e\\+06", 1e7)])
def test_fp16_scale_overflow_is_refused(fmt, limit, largest):
    w = W.at[7, 9].set(-largest)
    refused({"w": w}, ValueError, rf"'w' \(shape \(64, 128\)\): its largest magnitude {largest:.6g}".replace("+", r"\+")
            + rf" overflows {fmt}'s fp16 block scales, which hold magnitudes up to about {limit}", fmt)


@pytest.mark.parametrize("fmt,largest", [("q4_0", 5e5), ("q4_1", 6e4), ("q8_0", 8e6), ("nf4", 1e15), ("int8", 1e15)])
def test_large_weights_within_the_scales_round_trip(fmt, largest):
    w = W / jnp.abs(W).max() * largest
    back = lorax.quantize({"w": w}, fmt)["w"].dequantize()
    assert bool(jnp.all(jnp.isfinite(back)))
    assert float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w)) < 0.15


# ----------------------------------------------------------------------------- axis and block


@pytest.mark.parametrize("fmt", FORMATS)
def test_axis_is_honoured(fmt):
    """Blocks run along the axis asked for: each block's scale comes from values along axis 0."""
    w = jax.random.normal(jax.random.key(1), (128, 4)) * jnp.arange(1, 129)[:, None]
    q = lorax.quantize({"w": w}, fmt, axis=0)["w"]
    block = 128 if fmt == "int8" else q.block
    assert q.axis == -2 and q.shape == (128, 4) and q.scale.shape == (128 // block, 4)
    absmax = jnp.abs(w).reshape(128 // block, block, 4).max(axis=1)
    if fmt in ("nf4",):
        np.testing.assert_allclose(q.scale, absmax, rtol=1e-6)
    if fmt in ("int8", "q8_0"):
        np.testing.assert_allclose(q.scale.astype(jnp.float32), absmax / 127, rtol=1e-3)
    error = float(jnp.linalg.norm(q.dequantize() - w) / jnp.linalg.norm(w))
    assert error < 0.15
    again = lorax.quantize({"w": w}, fmt, axis=np.int64(-2))["w"]
    assert again.axis == q.axis and np.array_equal(again.codes, q.codes)


def test_int8_axis_zero_of_a_stack():
    """axis=0 of a [layers, in, out] stack: one scale per (in, out) over the layers."""
    w = jax.random.normal(jax.random.key(2), (4, 8, 16))
    q = lorax.quantize({"w": w}, "int8", axis=0)["w"]
    assert q.axis == -3 and q.block == 4 and q.scale.shape == (1, 8, 16)
    np.testing.assert_allclose(q.scale[0], jnp.abs(w).max(axis=0) / 127, rtol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis", [2, -3, 100])
def test_out_of_range_axis_is_refused(fmt, axis):
    refused({"w": W}, ValueError, rf"'w' \(shape \(64, 128\)\): axis {axis} is out of range for a weight of 2 axes; "
            r"pass an axis in \[-2, 1\]", fmt, axis=axis)


@pytest.mark.parametrize("axis", [True, 1.0, "0", [0]])
def test_axis_of_the_wrong_type_is_refused(axis):
    refused({"w": W}, TypeError, r"lorax.quantize: axis must be None or an int, got", "nf4", axis=axis)


@pytest.mark.parametrize("block", [0, -32, np.int64(0)])
def test_non_positive_block_is_refused(block):
    refused({"w": W}, ValueError, rf"lorax.quantize: block must be a positive int, got {int(block)}\.", "nf4",
            block=block)


@pytest.mark.parametrize("block", [True, 32.0, "32", [32]])
def test_block_of_the_wrong_type_is_refused(block):
    refused({"w": W}, TypeError, r"lorax.quantize: block must be a positive int, got", "int8", block=block)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_gguf_formats_take_blocks_of_32_only(fmt):
    refused({"w": W}, ValueError, rf"lorax.quantize: {fmt} stores blocks of 32 .*got block=16", fmt, block=16)
    assert lorax.quantize({"w": W}, fmt, block=np.int32(32))["w"].block == 32


def test_block_must_divide_the_axis_and_be_even_for_4_bits():
    refused({"w": W}, ValueError, r"'w' \(shape \(64, 128\)\): the block size 48 does not divide axis -1 of length "
            "128", "nf4", block=48, axis=-1)
    refused({"w": W}, ValueError, r"'w' \(shape \(64, 128\)\): the block size 1 does not divide axis -1 of length "
            "128 into an even block", "nf4", block=1)
    q = lorax.quantize({"w": W}, "int8", block=np.int64(16), axis=1)["w"]
    assert (q.block, q.axis, q.scale.shape) == (16, -1, (64, 8))


def test_double_quant_is_a_bool_for_nf4():
    refused({"w": W}, TypeError, r"double_quant must be True or False, got 'yes'", "nf4", double_quant="yes")
    refused({"w": W}, ValueError, r"double_quant applies to nf4, not 'q4_0'", "q4_0", double_quant=True)
    assert lorax.quantize({"w": W}, "nf4", double_quant=np.bool_(True))["w"].scale.fmt == "u8"


# ----------------------------------------------------------------------------- fmt and targets


@pytest.mark.parametrize("fmt", ["Q4_0", "u8", "fp8", ""])
def test_unknown_format_is_refused(fmt):
    refused({"w": W}, ValueError, rf"unknown format {fmt!r}; choose one of nf4, int8, q4_0, q4_1, q8_0, bf16\.", fmt)


@pytest.mark.parametrize("fmt", [4, None, ["nf4"], b"nf4"])
def test_format_of_the_wrong_type_is_refused(fmt):
    refused({"w": W}, TypeError, r"lorax.quantize: fmt must be a format name, one of nf4, int8, q4_0, q4_1, q8_0",
            fmt)


@pytest.mark.parametrize("targets", [3, [3], ["w", None], b"w", {"w"}])
def test_targets_of_the_wrong_type_are_refused(targets):
    refused({"w": W}, TypeError, r"lorax.quantize: targets must be None, a regex string, a list of them or a "
            r"predicate", "nf4", targets)


@pytest.mark.parametrize("targets", ["(", ["w", "[a-"]])
def test_bad_regex_in_targets_is_refused(targets):
    refused({"w": W}, ValueError, r"lorax.quantize: targets '(\(|\[a-)' is not a valid regex \(.*at position", "nf4",
            targets)


def test_targets_matching_nothing_list_the_weights():
    params = {"attn": {"kernel": W, "bias": jnp.zeros(128)}, "done": lorax.quantize({"w": W}, "nf4")["w"]}
    refused(params, ValueError, r"targets='.*query.*' matched no weight to quantize.*\n  attn/bias \(128,\) float32\n"
            r"  attn/kernel \(64, 128\) float32$", "nf4", ".*query.*")
    refused(params, ValueError, r"targets=<function", "nf4", lambda path, leaf: False)
    refused({"bias": jnp.zeros(3)}, ValueError, r"params hold no floating weight of two or more axes", "int8")
    refused({"done": params["done"]}, ValueError, r"\n  \(none\)", "nf4", "done")


def test_long_candidate_lists_are_cut():
    params = {f"w{i:02d}": jnp.ones((2, 64)) for i in range(25)}
    with pytest.raises(ValueError, match=r"  w19 \(2, 64\) float32\n  \.\.\. and 5 more$"):
        lorax.quantize(params, "nf4", "nothing")


def test_a_list_of_regexes_selects_each():
    params = {"a": W, "b": W, "c": W}
    q = lorax.quantize(params, "q8_0", ["a", "c"])
    assert [type(q[k]).__name__ for k in "abc"] == ["QuantizedArray", "ArrayImpl", "QuantizedArray"]


def test_non_floating_target_is_refused():
    refused({"ids": jnp.ones((4, 64), jnp.int32)}, ValueError, r"'ids' \(int32\[4, 64\]\) is not a floating array",
            "nf4", "ids")


def test_errors_come_before_any_weight_is_encoded(monkeypatch):
    """A bad last weight is found before the first is quantized."""
    calls = []
    monkeypatch.setattr(lorax._src.bases.quantize, "_encode", lambda *a: calls.append(a))
    refused({"a": W, "b": jnp.ones((4, 48))}, ValueError, r"'b' \(shape \(4, 48\)\)", "q4_0", axis=-1)
    assert calls == []


# ----------------------------------------------------------------------------- merge_quantized and QuantizedArray


def adapter_over(fmt, b_value):
    q = lorax.quantize({"w": W}, fmt)["w"]
    return lorax.LoraWeight(q, jnp.ones((64, 2)), jnp.full((2, 128), b_value))


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_quantized_refuses_a_non_finite_merge(fmt):
    params = {"layer": adapter_over(fmt, jnp.nan)}
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"lorax.merge_quantized: 'layer' \(shape \(64, 128\)\): the weight holds "
                                         r"NaN or inf \(8192 NaN, 0 inf\)"):
        lorax.merge_quantized(params)
    assert_unchanged(params, before)


def test_merge_quantized_refuses_a_nan_base_scale():
    lw = adapter_over("nf4", 0.0)
    lw = lw.replace(w=lw.w.replace(scale=lw.w.scale.at[0, 0].set(jnp.nan)))
    with pytest.raises(ValueError, match=r"lorax.merge_quantized: 'w' \(shape \(64, 128\)\).*\(64 NaN, 0 inf\)"):
        lorax.merge_quantized({"w": lw})


def test_merge_quantized_refuses_fp16_overflow():
    params = {"w": adapter_over("q8_0", 1e7)}
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"lorax.merge_quantized: 'w' \(shape \(64, 128\)\): its largest magnitude "
                                         r"2e\+07 overflows q8_0's fp16 block scales"):
        lorax.merge_quantized(params)
    assert_unchanged(params, before)


@pytest.mark.parametrize("changes,error,match", [
    (dict(fmt="q5_k"), ValueError, r"fmt must be one of nf4, int8, q4_0, q4_1, q8_0, u8, got 'q5_k'"),
    (dict(fmt=["nf4"]), ValueError, r"fmt must be one of .*got \['nf4'\]"),
    (dict(block=0), ValueError, r"QuantizedArray: block must be a positive int, got 0"),
    (dict(block=64.0), TypeError, r"QuantizedArray: block must be a positive int, got 64.0"),
    (dict(block=63), ValueError, r"nf4 stores blocks of an even size \(two codes a byte\), got block=63"),
    (dict(fmt="q8_0", block=64), ValueError, r"q8_0 stores blocks of 32, got block=64"),
    (dict(axis=1), ValueError, r"axis must be a negative int \(the block axis counted from the end\), got 1"),
    (dict(axis=True), ValueError, r"axis must be a negative int .*got True"),
    (dict(dtype=jnp.int8), ValueError, r"dtype must be a floating dtype, got <class 'jax.numpy.int8'>"),
    (dict(dtype="no-such-dtype"), ValueError, r"dtype must be a floating dtype, got 'no-such-dtype'")])
def test_quantized_array_layout_is_checked(changes, error, match):
    q = lorax.quantize({"w": W}, "nf4")["w"]
    with pytest.raises(error, match=match):
        q.replace(**changes)
    assert q.fmt == "nf4" and q.block == 64 and q.axis == -1


def test_quantized_array_normalizes_numpy_layout():
    q = lorax.quantize({"w": W}, "nf4")["w"].replace(block=np.int64(64), axis=np.int32(-1), dtype="bfloat16")
    assert type(q.block) is int and type(q.axis) is int and q.dtype == jnp.bfloat16
    assert jax.tree.structure(q) == jax.tree.structure(lorax.quantize({"w": W}, "nf4")["w"].astype(jnp.bfloat16))
