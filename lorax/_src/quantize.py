"""`lorax.quantize`, `lorax.gguf_tensor` and `lorax.merge_quantized`: making quantized bases.

>>> import jax, jax.numpy as jnp, lorax
>>> params = {"w": jax.random.normal(jax.random.key(0), (128, 64)), "bias": jnp.zeros(64)}
>>> q = lorax.quantize(params, "nf4")
>>> type(q["w"]).__name__, type(q["bias"]).__name__, round(q["w"].bits_per_value(), 2)
('QuantizedArray', 'ArrayImpl', 4.5)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src.adapter import Adapter
from lorax._src.paths import unique_named_leaves
from lorax._src.quantized import FORMATS, NF4, QuantizedArray
from lorax._src.trainable import Trainable
from lorax._src.trees import _map

Targets = str | Callable[[str, Any], bool] | None
DOUBLE_QUANT_BLOCK = 256  # absmax values per 8-bit block when NF4's scales are quantized again


def encode(x: jax.Array, fmt: str, block: int, axis: int, *, double_quant: bool = False,
           path: str = "") -> QuantizedArray:
    """``x`` quantized to ``fmt`` in blocks of ``block`` along ``axis``."""
    f = FORMATS[fmt]
    x = jnp.asarray(x)
    axis = axis % x.ndim - x.ndim
    n = x.shape[axis]
    if n % block or (f.bits == 4 and block % 2):
        odd = " into an even block" if n % block == 0 else ""
        raise ValueError(f"lorax.quantize: {path or 'the weight'!r} (shape {tuple(x.shape)}): the block size {block} "
                         f"does not divide axis {axis} of length {n}{odd}; choose a block size that divides it, "
                         "or another axis.")
    if double_quant:
        count = n // block
        if count % min(DOUBLE_QUANT_BLOCK, count):
            raise ValueError(f"lorax.quantize: {path or 'the weight'!r} (shape {tuple(x.shape)}) has {count} blocks "
                             f"along axis {axis}, which blocks of {DOUBLE_QUANT_BLOCK} scales do not divide; "
                             "pass double_quant=False.")
    return _encode(x, fmt, block, axis, double_quant)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _encode(x: jax.Array, fmt: str, block: int, axis: int, double_quant: bool) -> QuantizedArray:
    f = FORMATS[fmt]
    n = x.shape[axis]
    blocks = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    lead = blocks.shape[:-1]
    blocks = blocks.reshape(*lead, n // block, block)
    q, scale, offset = _ENCODERS[fmt](blocks)
    if f.bits == 4:
        q = q.reshape(*lead, n // block, 2, block // 2)
        q = q[..., 0, :] | (q[..., 1, :] << 4)
    codes, scale = jnp.moveaxis(q.reshape(*lead, -1), -1, axis), jnp.moveaxis(scale, -1, axis)
    offset = None if offset is None else jnp.moveaxis(offset, -1, axis)
    if double_quant:
        scale = _encode(scale, "u8", min(DOUBLE_QUANT_BLOCK, scale.shape[axis]), axis, False)
    return QuantizedArray(codes, scale, offset, fmt=fmt, block=block, axis=axis, dtype=x.dtype)


def _absmax(blocks):
    return jnp.max(jnp.abs(blocks), axis=-1)


def _safe(d):
    return jnp.where(d == 0, 1.0, d)


def _nf4(blocks):
    d = _absmax(blocks)
    q = jnp.argmin(jnp.abs(blocks[..., None] / _safe(d)[..., None, None] - NF4), axis=-1)
    return q.astype(jnp.uint8), d, None


def _symmetric8(scale_dtype):
    def enc(blocks):
        d = (_absmax(blocks) / 127).astype(scale_dtype)
        q = jnp.clip(jnp.round(blocks / _safe(d.astype(jnp.float32))[..., None]), -127, 127)
        return q.astype(jnp.int8), d, None
    return enc


def _q4_0(blocks):  # llama.cpp's quantize_row_q4_0_ref: the signed value of largest magnitude maps to -8
    big = jnp.take_along_axis(blocks, jnp.argmax(jnp.abs(blocks), axis=-1)[..., None], axis=-1)[..., 0]
    d = big / -8
    inv = jnp.where(d == 0, 0.0, 1 / _safe(d))
    q = jnp.minimum(15, jnp.floor(blocks * inv[..., None] + 8.5))
    return q.astype(jnp.uint8), d.astype(jnp.float16), None


def _affine(levels: int, scale_dtype):
    def enc(blocks):
        low, high = jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)
        d = (high - low) / levels
        inv = jnp.where(d == 0, 0.0, 1 / _safe(d))
        q = jnp.clip(jnp.floor((blocks - low[..., None]) * inv[..., None] + 0.5), 0, levels)
        return q.astype(jnp.uint8), d.astype(scale_dtype), low.astype(scale_dtype)
    return enc


_ENCODERS = {"nf4": _nf4, "int8": _symmetric8(jnp.float32), "q8_0": _symmetric8(jnp.float16), "q4_0": _q4_0,
             "q4_1": _affine(15, jnp.float16), "u8": _affine(255, jnp.float32)}


def quantize(params: Any, fmt: str, targets: Targets = None, *, block: int | None = None, axis: int | None = None,
             double_quant: bool = False) -> Any:
    """``params`` with each targeted weight replaced by a `QuantizedArray` in ``fmt``.

    ``fmt``: ``"nf4"`` (blocks of 64 along the last axis they divide, fp32 absmax; ``double_quant`` stores
    the absmax in 8 bits too), ``"int8"`` (one scale per output channel: the block is the whole
    input axis, ``-2`` of a Flax ``[in, out]`` kernel), or a GGUF block format (``"q4_0"``,
    ``"q4_1"``, ``"q8_0"``: blocks of 32 along the input axis; each format takes the last axis its blocks divide when
    its usual one does not, or ``axis``). ``targets``: a regex on paths,
    a predicate ``(path, leaf) -> bool``, or None for every floating leaf of two or more axes.
    An adapter's frozen ``w`` is quantized in place; a `Trainable` leaf cannot be.

    >>> import jax.numpy as jnp, lorax
    >>> q = lorax.quantize({"kernel": jnp.ones((8, 4))}, "int8")["kernel"]
    >>> q.codes.dtype, q.scale.shape, q.dequantize().tolist()[0]
    (dtype('int8'), (1, 4), [1.0, 1.0, 1.0, 1.0])
    """
    if fmt not in FORMATS or fmt == "u8":
        raise ValueError(f"lorax.quantize: unknown format {fmt!r}; choose one of nf4, int8, q4_0, q4_1, q8_0.")
    if double_quant and fmt != "nf4":
        raise ValueError(f"lorax.quantize: double_quant applies to nf4, not {fmt!r}.")
    unique_named_leaves(params, "lorax.quantize")
    pattern = re.compile(targets) if isinstance(targets, str) else None

    def wanted(path: str, leaf: Any) -> bool:
        if pattern is not None:
            return pattern.fullmatch(path) is not None
        if callable(targets):
            return bool(targets(path, leaf))
        return jnp.ndim(leaf) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)

    def one(path: str, leaf: Any) -> Any:
        base = leaf.w if isinstance(leaf, Adapter) else leaf.value if isinstance(leaf, Trainable) else leaf
        if isinstance(base, QuantizedArray) or not hasattr(base, "shape") or not wanted(path, base):
            return leaf
        if isinstance(leaf, Trainable):
            raise ValueError(f"lorax.quantize: {path!r} (shape {tuple(base.shape)}) is marked Trainable "
                             "(trained fully); a quantized weight is frozen. Exclude it from targets.")
        if not jnp.issubdtype(base.dtype, jnp.floating) or jnp.ndim(base) < 1:
            raise ValueError(f"lorax.quantize: {path!r} ({base.dtype}{list(base.shape)}) is not a floating "
                             "array with an axis to quantize; exclude it from targets.")
        size = block or FORMATS[fmt].block or 64
        if fmt == "int8":
            ax = -2 if axis is None and jnp.ndim(base) >= 2 else (axis or -1)
            size = block or base.shape[ax]
        elif axis is not None:
            ax = axis
        else:  # the input axis (GGUF) or the last axis, if the blocks divide it; else the last that they divide
            first = -2 if fmt != "nf4" and jnp.ndim(base) >= 2 else -1
            fits = [k for k in (first, *range(-1, -jnp.ndim(base) - 1, -1)) if base.shape[k] % size == 0]
            ax = fits[0] if fits else first
        q = encode(base, fmt, size, ax, double_quant=double_quant, path=path)
        return leaf.replace(w=q) if isinstance(leaf, Adapter) else q

    return _map(one, params)


# ----------------------------------------------------------------------------- GGUF

GGUF_BLOCKS = {"Q4_0": ("q4_0", 2), "Q4_1": ("q4_1", 4), "Q8_0": ("q8_0", 2)}  # format, bytes before the codes


def gguf_tensor(tensor: Any) -> QuantizedArray | np.ndarray:
    """A tensor of a ``gguf.GGUFReader`` as stored: Q4_0, Q4_1 and Q8_0 blocks become a
    `QuantizedArray` over the file's bytes (no re-quantization), F32/F16 tensors an array.
    The shape is NumPy's (GGUF's reversed): ``[rows, in]``, blocks along the last axis.

    >>> import numpy as np, lorax
    >>> from types import SimpleNamespace as T
    >>> block = np.array([0, 60, 0, 0] + [0x21] * 16, np.uint8)   # Q4_1: d=1.0, m=0, codes 1 and 2
    >>> t = T(name="w", tensor_type=T(name="Q4_1"), shape=np.array([32, 1]), data=block[None])
    >>> lorax.gguf_tensor(t).dequantize()[0, [0, 16]].tolist()
    [1.0, 2.0]
    """
    kind = tensor.tensor_type.name
    shape = tuple(reversed([int(n) for n in tensor.shape]))
    if kind in ("F32", "F16"):
        return np.asarray(tensor.data).reshape(shape)
    if kind not in GGUF_BLOCKS:
        raise ValueError(f"lorax.gguf_tensor: {tensor.name!r} (shape {list(shape)}) is stored as {kind}; lorax reads "
                         f"{', '.join(GGUF_BLOCKS)} blocks and F32/F16 as stored. Dequantize it with "
                         "gguf.quants.dequantize, or quantize the model to a supported type.")
    fmt, head = GGUF_BLOCKS[kind]
    if shape[-1] % 32:
        raise ValueError(f"lorax.gguf_tensor: {tensor.name!r} rows of {shape[-1]} are not whole blocks of 32.")
    raw = np.asarray(tensor.data, np.uint8).reshape(*shape[:-1], shape[-1] // 32, -1)
    half = lambda k: np.ascontiguousarray(raw[..., 2 * k:2 * k + 2]).view(np.float16)[..., 0]  # noqa: E731
    codes = np.ascontiguousarray(raw[..., head:]).reshape(*shape[:-1], -1)
    codes = codes.view(np.int8) if fmt == "q8_0" else codes
    return QuantizedArray(jnp.asarray(codes), jnp.asarray(half(0)), jnp.asarray(half(1)) if fmt == "q4_1" else None,
                          fmt=fmt, block=32, axis=-1, dtype=np.dtype(np.float32))


# ----------------------------------------------------------------------------- merging


def merge_quantized(params: Any) -> tuple[Any, dict[str, float]]:
    """Merge each adapter over a quantized base and quantize the result again in the base's
    format; returns the tree and, per merged weight, the rounding error
    ``‖requantized - merged‖ / ‖merged‖``. (`lorax.merge` gives the full-precision merge.)

    >>> import jax, jax.numpy as jnp, lorax
    >>> w = lorax.quantize({"w": jax.random.normal(jax.random.key(0), (64, 64))}, "nf4")["w"]
    >>> lw = lorax.LoraWeight(w, jnp.ones((64, 2)) * 0.1, jnp.ones((2, 64)) * 0.1)
    >>> tree, error = lorax.merge_quantized({"w": lw})
    >>> type(tree["w"]).__name__, 0 < error["w"] < 0.15
    ('QuantizedArray', True)
    """
    errors: dict[str, float] = {}

    def one(path: str, leaf: Any) -> Any:
        if isinstance(leaf, Adapter) and isinstance(leaf.w, QuantizedArray):
            leaf.check(path)
            q = leaf.w
            merged = leaf.replace(w=q.dequantize()).merged()
            again = encode(merged, q.fmt, q.block, q.axis, double_quant=isinstance(q.scale, QuantizedArray), path=path)
            diff = again.dequantize().astype(jnp.float32) - merged.astype(jnp.float32)
            errors[path] = float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(merged.astype(jnp.float32)),
                                                                      1e-30))
            return again
        if isinstance(leaf, Adapter):
            return leaf.merged()
        return leaf.value if isinstance(leaf, Trainable) else leaf

    return _map(one, params), errors

