"""`lorax.gguf_tensor`: GGUF tensors (Q4_0, Q4_1, Q8_0, F32, F16) read as stored and equal to the gguf
package's dequantization; malformed tensors refused by name, leaving the tensor's data untouched."""

import os
import tempfile
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

import lorax


@pytest.fixture(scope="module")
def gguf_file():
    """The tensors of a GGUF file written by the gguf package, by type name."""
    gguf = pytest.importorskip("gguf")
    data = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    path = os.path.join(tempfile.mkdtemp(), "t.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(f"blk.0.{kind}.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.add_tensor("blk.0.F32.weight", data)
    writer.add_tensor("blk.0.F16.weight", data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return data, {t.tensor_type.name: t for t in gguf.GGUFReader(path).tensors}


def gguf_refused(tensor, error, match):
    before = np.array(tensor.data)
    with pytest.raises(error, match=match):
        lorax.gguf_tensor(tensor)
    assert np.array_equal(np.asarray(tensor.data), before)


@pytest.mark.parametrize("kind,bound", [("Q4_0", 0.3), ("Q4_1", 0.3), ("Q8_0", 0.02), ("F32", 0), ("F16", 1e-3)])
def test_gguf_reader_tensors_read_back(gguf_file, kind, bound):
    data, tensors = gguf_file
    got = lorax.gguf_tensor(tensors[kind])
    dense = got.dequantize() if isinstance(got, lorax.QuantizedArray) else got
    assert dense.shape == (8, 64) and float(np.abs(np.asarray(dense, np.float32) - data).max()) <= bound


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_block_data_of_the_wrong_size_is_refused(gguf_file, kind):
    t = gguf_file[1][kind]
    row = {"Q4_0": 36, "Q4_1": 40, "Q8_0": 68}[kind]
    gguf_refused(t._replace(data=t.data[:4]), ValueError, rf"'blk.0.{kind}.weight' \(shape \[8, 64\], {kind}\) holds "
                 rf"{4 * row} uint8 values; its 16 blocks take {8 * row} uint8 bytes")
    gguf_refused(t._replace(shape=np.array([64, 4], np.uint32)), ValueError,
                 rf"'blk.0.{kind}.weight' \(shape \[4, 64\], {kind}\) holds {8 * row} uint8 values; its 8 blocks take "
                 rf"{4 * row} uint8 bytes")
    gguf_refused(t._replace(data=t.data.view(np.uint16)), ValueError, rf"holds {4 * row} uint16 values; its 16 blocks")
    gguf_refused(t._replace(data=t.data.astype(np.float32)), ValueError, rf"holds {8 * row} float32 values")


@pytest.mark.parametrize("kind", ["F32", "F16"])
def test_gguf_float_data_of_the_wrong_size_or_dtype_is_refused(gguf_file, kind):
    t = gguf_file[1][kind]
    dtype = "float32" if kind == "F32" else "float16"
    gguf_refused(t._replace(data=t.data[:7]), ValueError, rf"'blk.0.{kind}.weight' \(shape \[8, 64\], {kind}\) holds "
                 rf"448 {dtype} values; expected 512 {dtype} values")
    gguf_refused(t._replace(data=t.data.astype(np.float64)), ValueError, r"holds 512 float64 values; expected 512")


def test_gguf_rows_that_are_not_whole_blocks_name_the_tensor(gguf_file):
    t = gguf_file[1]["Q8_0"]
    gguf_refused(t._replace(shape=np.array([48, 8], np.uint32)), ValueError,
                 r"'blk.0.Q8_0.weight' \(shape \[8, 48\], Q8_0\): rows of 48 are not whole blocks of 32")


@pytest.mark.parametrize("shape,error,match", [
    (np.array([0, 8]), ValueError, r"'blk.0.Q4_0.weight': shape\[0\] must be a positive int, got 0"),
    (np.array([64.0, 8.0]), TypeError, r"'blk.0.Q4_0.weight': shape\[0\] must be a positive int, got "
     r"(np.float64\()?64.0"),
    (np.array([], np.uint32), ValueError, r"'blk.0.Q4_0.weight': shape must list its dimensions"),
    (np.uint32(512), ValueError, r"'blk.0.Q4_0.weight': shape must list its dimensions")])
def test_gguf_bad_shapes_name_the_tensor(gguf_file, shape, error, match):
    gguf_refused(gguf_file[1]["Q4_0"]._replace(shape=shape), error, match)


def test_gguf_non_finite_block_scales_are_refused(gguf_file):
    t = gguf_file[1]["Q4_1"]
    data = np.array(t.data)
    data[2, 20 + 2:20 + 4] = np.array([np.inf], np.float16).view(np.uint8)  # row 2, second block's minimum
    gguf_refused(t._replace(data=data), ValueError, r"'blk.0.Q4_1.weight' \(shape \[8, 64\], Q4_1\): block scales "
                 "hold NaN or inf")


def test_gguf_objects_that_are_not_tensors_are_refused(gguf_file):
    t = gguf_file[1]["Q4_0"]
    with pytest.raises(TypeError, match=r"expected a gguf.GGUFReader tensor .*got a ndarray without name, "
                                        r"tensor_type\.$"):
        lorax.gguf_tensor(np.zeros(3))
    gguf_refused(t._replace(tensor_type="Q4_0"), TypeError, r"'blk.0.Q4_0.weight': tensor_type must be a "
                 r"gguf.GGMLQuantizationType, got 'Q4_0'")


def gguf_tensor_of(data, qtype, name="blk.0.attn_q.weight"):
    """A stand-in for a ``gguf.GGUFReader`` tensor holding ``data`` encoded by the gguf package."""
    gguf = pytest.importorskip("gguf")
    raw = gguf.quants.quantize(data, qtype)
    return SimpleNamespace(name=name, tensor_type=qtype, shape=np.array(data.shape[::-1]), data=raw), raw


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_as_stored_match_gguf_dequantize(kind):
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[kind]
    data = np.random.default_rng(0).normal(size=(48, 128)).astype(np.float32)
    tensor, raw = gguf_tensor_of(data, qtype)
    q = lorax.gguf_tensor(tensor)
    assert q.shape == (48, 128) and q.fmt == kind.lower()
    np.testing.assert_allclose(np.asarray(q.dequantize()), gguf.quants.dequantize(raw, qtype), rtol=1e-6, atol=1e-7)
    assert q.nbytes == raw.nbytes  # the file's bytes, no more
    again = lorax.quantize({"w": jnp.asarray(data)}, kind.lower(), axis=-1)["w"]  # lorax's encoder, llama.cpp's rule
    np.testing.assert_allclose(again.dequantize(), q.dequantize(), atol=float(np.abs(data).max()) / 6)


def test_unsupported_gguf_type_names_the_tensor_and_type():
    tensor = SimpleNamespace(name="blk.3.ffn_down.weight", tensor_type=SimpleNamespace(name="Q6_K"),
                             shape=np.array([256, 4]), data=np.zeros((4, 210), np.uint8))
    with pytest.raises(ValueError, match=r"'blk.3.ffn_down.weight'.*Q6_K"):
        lorax.gguf_tensor(tensor)
