"""`lorax.quantize`, `lorax.gguf_tensor` and `lorax.merge_quantized`: making quantized bases.

>>> import jax, jax.numpy as jnp, lorax
>>> params = {"w": jax.random.normal(jax.random.key(0), (128, 64)), "bias": jnp.zeros(64)}
>>> q = lorax.quantize(params, "nf4")
>>> type(q["w"]).__name__, type(q["bias"]).__name__, round(q["w"].bits_per_value(), 2)
('QuantizedArray', 'ArrayImpl', 4.5)
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src import compat
from lorax._src.bases.bits import BF16, Bf16Bits, held_as_bits
from lorax._src.bases.formats import FORMATS, GGUF_BLOCK, GGUF_TYPES
from lorax._src.bases.quantized import QuantizedArray, is_frozen_base
from lorax._src.kinds.adapter import Adapter
from lorax._src.paths import regexes, unique_named_leaves
from lorax._src.trainable import Trainable
from lorax._src.trees import _map
from lorax._src.validate import index

Targets = str | Sequence[str] | Callable[[str, Any], bool] | None
QUANTIZE_FORMATS = (*(name for name, f in FORMATS.items() if f.made_by_quantize), BF16)
DOUBLE_QUANT_BLOCK = 256  # absmax values per 8-bit block when NF4's scales are quantized again
LISTED = 20  # candidate weights listed when targets match nothing


def encode(x: jax.Array, fmt: str, block: int, axis: int, *, double_quant: bool = False,
           path: str = "", who: str = "lorax.quantize") -> QuantizedArray:
    """``x`` quantized to ``fmt`` in blocks of ``block`` along ``axis``. A concrete ``x`` must be
    finite and fit the format's scales (a traced one is not checked)."""
    x = jnp.asarray(x)
    where = f"{who}: {path or 'the weight'!r} (shape {tuple(x.shape)})"
    axis = check_layout(x.shape, fmt, block, axis, double_quant, where)
    if compat.is_tracer(x):
        return _encode(x, fmt, block, axis, double_quant)
    _check_finite(x, where)
    q = _encode(x, fmt, block, axis, double_quant)
    _check_scales(q, x, where)
    return q


def normalized_axis(axis: int, ndim: int, where: str) -> int:
    """``axis`` of a weight of ``ndim`` axes, counted from the end (negative)."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{where}: axis {axis} is out of range for a weight of {ndim} axes; "
                         f"pass an axis in [{-ndim}, {ndim - 1}].")
    return axis % ndim - ndim


def check_layout(shape: tuple[int, ...], fmt: str, block: int, axis: int, double_quant: bool, where: str) -> int:
    """The block axis (negative) after checking that blocks of ``block`` tile it in ``fmt``."""
    axis = normalized_axis(axis, len(shape), where)
    n = shape[axis]
    if n % block or (FORMATS[fmt].bits == 4 and block % 2):
        odd = " into an even block" if n % block == 0 else ""
        raise ValueError(f"{where}: the block size {block} does not divide axis {axis} of length {n}{odd}; "
                         "choose a block size that divides it, or another axis.")
    count = n // block
    if double_quant and count % min(DOUBLE_QUANT_BLOCK, count):
        raise ValueError(f"{where} has {count} blocks along axis {axis}, which blocks of {DOUBLE_QUANT_BLOCK} "
                         "scales do not divide; pass double_quant=False.")
    return axis


def _check_finite(x: jax.Array, where: str) -> None:
    if bool(jnp.all(jnp.isfinite(x))):
        return
    nan, inf = int(jnp.sum(jnp.isnan(x))), int(jnp.sum(jnp.isinf(x)))
    raise ValueError(f"{where}: the weight holds NaN or inf ({nan} NaN, {inf} inf); quantized blocks cannot "
                     "represent them. Find where they come from, or leave this weight unquantized.")


def _check_scales(q: QuantizedArray, x: jax.Array, where: str) -> None:
    """Refuse fp16 block scales (or offsets) that overflowed to inf."""
    limit = FORMATS[q.fmt].largest
    per_block = [a for a in (q.scale, q.offset) if a is not None]
    if limit is None or all(bool(jnp.all(jnp.isfinite(a))) for a in per_block):
        return
    largest = float(jnp.max(jnp.abs(x)))
    raise ValueError(f"{where}: its largest magnitude {largest:.6g} overflows {q.fmt}'s fp16 block scales, which "
                     f"hold magnitudes up to about {limit:.6g}; scale the weight down, or use nf4 or int8 "
                     "(fp32 scales).")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _encode(x: jax.Array, fmt: str, block: int, axis: int, double_quant: bool) -> QuantizedArray:
    f = FORMATS[fmt]
    n = x.shape[axis]
    blocks = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    lead = blocks.shape[:-1]
    blocks = blocks.reshape(*lead, n // block, block)
    q, scale, offset = f.encode(blocks)
    if f.bits == 4:
        q = q.reshape(*lead, n // block, 2, block // 2)
        q = q[..., 0, :] | (q[..., 1, :] << 4)
    codes, scale = jnp.moveaxis(q.reshape(*lead, -1), -1, axis), jnp.moveaxis(scale, -1, axis)
    offset = None if offset is None else jnp.moveaxis(offset, -1, axis)
    if double_quant:
        scale = _encode(scale, "u8", min(DOUBLE_QUANT_BLOCK, scale.shape[axis]), axis, False)
    return QuantizedArray(codes, scale, offset, fmt=fmt, block=block, axis=axis, dtype=x.dtype)


def quantize(params: Any, fmt: str, targets: Targets = None, *, block: int | None = None, axis: int | None = None,
             double_quant: bool = False) -> Any:
    """``params`` with each targeted weight replaced by a `QuantizedArray` in ``fmt`` (a
    `Bf16Bits` for ``"bf16"``).

    Args:
      params: a tree of arrays; adapters' frozen ``w`` are quantized in place, weights
        already quantized are left as they are, and a targeted `Trainable` leaf is refused.
      fmt: ``"nf4"`` (blocks of 64 along the last axis they divide, fp32 absmax; ``double_quant``
        stores the absmax in 8 bits too), ``"int8"`` (one fp32 scale per output channel: the block
        is the whole input axis, ``-2`` of a Flax ``[in, out]`` kernel, or the whole ``axis``), or
        a GGUF block format (``"q4_0"``, ``"q4_1"``, ``"q8_0"``: fp16 scales over blocks of 32
        along the input axis, or the last axis the blocks divide when that one does not), or
        ``"bf16"``: the weight rounded to bfloat16 (a bf16 weight kept exactly) and held as its
        16 bits, a `Bf16Bits`; no blocks, so ``block``, ``axis`` and ``double_quant`` stay unset.
        XLA:CPU slices bf16 in a loop through an fp32 copy of the whole array, so a step holds
        no copy of a bf16 layer stack only when the stack comes in as bits; a weight a product
        reads whole is best left bf16, since XLA:CPU writes out the bits it reinterprets there.
      targets: a regex or list of regexes fully matched against the paths, a predicate
        ``(path, leaf) -> bool``, or None for every floating leaf of two or more axes. Targets
        that match no weight are an error listing the weights.
      block: values per block, a positive int that divides the block axis (even for 4-bit
        formats); the GGUF formats take 32 only.
      axis: the block axis of every targeted weight, in ``[-ndim, ndim)``; default as above.
      double_quant: quantize NF4's absmax again (nf4 only).

    Each targeted weight must be a floating array whose values are finite and, in a GGUF format,
    small enough for its fp16 scales (``|w|`` up to about 5.2e5 for q4_0, 6.6e4 for q4_1, 8.3e6
    for q8_0); a traced weight's values are not checked. A bad argument or weight raises an error
    naming it (and the weight's path and shape); ``params`` are never modified.

    >>> import jax.numpy as jnp, lorax
    >>> q = lorax.quantize({"kernel": jnp.ones((8, 4))}, "int8")["kernel"]
    >>> q.codes.dtype, q.scale.shape, q.dequantize().tolist()[0]
    (dtype('int8'), (1, 4), [1.0, 1.0, 1.0, 1.0])
    >>> lorax.quantize({"kernel": jnp.ones((8, 4))}, "nf4", axis=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: lorax.quantize: 'kernel' (shape (8, 4)): axis 2 is out of range ...; pass an axis in [-2, 1].
    """
    fmt = _format(fmt)
    if fmt == BF16 and (block, axis) != (None, None):
        raise ValueError(f"lorax.quantize: bf16 has no blocks; leave block and axis unset, got block={block!r}, "
                         f"axis={axis!r}.")
    block = _block(block, fmt)
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"lorax.quantize: axis must be None or an int, got {axis!r} ({type(axis).__name__}).")
    if not isinstance(double_quant, (bool, np.bool_)):
        raise TypeError(f"lorax.quantize: double_quant must be True or False, got {double_quant!r}.")
    if double_quant and fmt != "nf4":
        raise ValueError(f"lorax.quantize: double_quant applies to nf4, not {fmt!r}.")
    wanted = _selector(targets)
    candidates = [(path, leaf, _base(leaf)) for path, leaf in unique_named_leaves(params, "lorax.quantize")]
    candidates = [(path, leaf, base) for path, leaf, base in candidates
                  if hasattr(base, "shape") and not is_frozen_base(base)]
    layouts = {path: _layout(path, leaf, base, fmt, block, None if axis is None else int(axis), bool(double_quant))
               for path, leaf, base in candidates if wanted(path, base)}
    if not layouts:
        raise ValueError(_matched_nothing(targets, [(path, base) for path, _, base in candidates]))

    def one(path: str, leaf: Any) -> Any:
        if path not in layouts:
            return leaf
        size, ax = layouts[path]
        if fmt == BF16:
            q = held_as_bits(_base(leaf), f"lorax.quantize: {path!r} (shape {tuple(_base(leaf).shape)})")
        else:
            q = encode(_base(leaf), fmt, size, ax, double_quant=bool(double_quant), path=path)
        return leaf.replace(w=q) if isinstance(leaf, Adapter) else q

    return _map(one, params)


def _format(fmt: Any) -> str:
    names = ", ".join(QUANTIZE_FORMATS)
    if not isinstance(fmt, str):
        raise TypeError(f"lorax.quantize: fmt must be a format name, one of {names}; got {fmt!r} "
                        f"({type(fmt).__name__}).")
    if fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"lorax.quantize: unknown format {fmt!r}; choose one of {names}.")
    return fmt


def _block(block: Any, fmt: str) -> int | None:
    if block is None:
        return None
    block = index(block, "lorax.quantize: block", minimum=1)
    fixed = FORMATS[fmt].block
    if fixed not in (None, block):
        raise ValueError(f"lorax.quantize: {fmt} stores blocks of {fixed} (GGUF's fixed size), got block={block}; "
                         "leave block unset.")
    return block


def _selector(targets: Any) -> Callable[[str, Any], bool]:
    """Whether ``targets`` asks for the weight at a path."""
    if targets is None:
        return lambda path, leaf: jnp.ndim(leaf) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
    if callable(targets):
        return lambda path, leaf: bool(targets(path, leaf))
    patterns = regexes(targets, "lorax.quantize: targets must be None, a regex string, a list of them or a "
                                f"predicate (path, leaf) -> bool, got {targets!r}.", "lorax.quantize: targets")
    return lambda path, leaf: any(p.fullmatch(path) for p in patterns)


def _base(leaf: Any) -> Any:
    """The array a leaf holds: an adapter's frozen ``w``, a `Trainable`'s value, or the leaf."""
    return leaf.w if isinstance(leaf, Adapter) else leaf.value if isinstance(leaf, Trainable) else leaf


def _layout(path: str, leaf: Any, base: Any, fmt: str, block: int | None, axis: int | None,
            double_quant: bool) -> tuple[int, int]:
    """The block size and (negative) block axis of a targeted weight, checked."""
    where = f"lorax.quantize: {path!r} (shape {tuple(base.shape)})"
    if isinstance(leaf, Trainable):
        raise ValueError(f"{where} is marked Trainable (trained fully); a quantized weight is frozen. "
                         "Exclude it from targets.")
    ndim = jnp.ndim(base)
    if not jnp.issubdtype(base.dtype, jnp.floating) or ndim < 1:
        raise ValueError(f"lorax.quantize: {path!r} ({base.dtype}{list(base.shape)}) is not a floating "
                         "array with an axis to quantize; exclude it from targets.")
    if fmt == BF16:
        return 0, -1
    size = block or FORMATS[fmt].block or 64
    if axis is not None:
        ax = normalized_axis(axis, ndim, where)
    elif fmt == "int8":
        ax = -2 if ndim >= 2 else -1
    else:  # the input axis (GGUF) or the last axis, if the blocks divide it; else the last that they divide
        first = -2 if fmt != "nf4" and ndim >= 2 else -1
        fits = [k for k in (first, *range(-1, -ndim - 1, -1)) if base.shape[k] % size == 0]
        ax = fits[0] if fits else first
    if fmt == "int8":
        size = block or base.shape[ax]
    return size, check_layout(tuple(base.shape), fmt, size, ax, double_quant, where)


def _matched_nothing(targets: Any, candidates: list[tuple[str, Any]]) -> str:
    what = ("params hold no floating weight of two or more axes" if targets is None
            else f"targets={targets!r} matched no weight")
    lines = [f"  {path} {tuple(base.shape)} {base.dtype}" for path, base in candidates[:LISTED]]
    if len(candidates) > LISTED:
        lines.append(f"  ... and {len(candidates) - LISTED} more")
    return (f"lorax.quantize: {what} to quantize (weights already quantized are left as they are). "
            "Weights of params not yet quantized:\n" + "\n".join(lines or ["  (none)"]))


# ----------------------------------------------------------------------------- GGUF

GGUF_FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}


def gguf_tensor(tensor: Any) -> QuantizedArray | np.ndarray:
    """A tensor of a ``gguf.GGUFReader`` as stored: Q4_0, Q4_1 and Q8_0 blocks become a
    `QuantizedArray` over the file's bytes (no re-quantization), F32/F16 tensors an array.
    The shape is NumPy's (GGUF's reversed): ``[rows, in]``, blocks along the last axis.

    The tensor needs ``name``, ``tensor_type`` (its ``.name`` the GGUF type), ``shape`` (GGUF's
    dimensions, positive ints) and ``data``: F32/F16 values of that dtype, one per element, or
    the blocks' bytes as uint8, the row length a multiple of 32 and each block's fp16 scale
    (and Q4_1's minimum) finite. Every error names the tensor.

    >>> import numpy as np, lorax
    >>> from types import SimpleNamespace as T
    >>> block = np.array([0, 60, 0, 0] + [0x21] * 16, np.uint8)   # Q4_1: d=1.0, m=0, codes 1 and 2
    >>> t = T(name="w", tensor_type=T(name="Q4_1"), shape=np.array([32, 1]), data=block[None])
    >>> lorax.gguf_tensor(t).dequantize()[0, [0, 16]].tolist()
    [1.0, 2.0]
    >>> lorax.gguf_tensor(T(name="w", tensor_type=T(name="Q4_1"), shape=np.array([64, 1]), data=block[None]))
    Traceback (most recent call last):
    ValueError: lorax.gguf_tensor: 'w' (shape [1, 64], Q4_1) holds 20 uint8 values; its 2 blocks take 40 uint8 bytes.
    """
    name, kind, shape = _gguf_header(tensor)
    where = f"lorax.gguf_tensor: {name!r} (shape {list(shape)}, {kind})"
    data = np.asarray(tensor.data)
    if kind in GGUF_FLOATS:
        if data.dtype != GGUF_FLOATS[kind] or data.size != math.prod(shape):
            raise ValueError(f"{where} holds {data.size} {data.dtype} values; expected {math.prod(shape)} "
                             f"{GGUF_FLOATS[kind]} values.")
        return data.reshape(shape)
    if kind not in GGUF_TYPES:
        raise ValueError(f"lorax.gguf_tensor: {name!r} (shape {list(shape)}) is stored as {kind}; lorax reads "
                         f"{', '.join(GGUF_TYPES)} blocks and F32/F16 as stored. Dequantize it with "
                         "gguf.quants.dequantize, or quantize the model to a supported type.")
    fmt = GGUF_TYPES[kind]
    head = FORMATS[fmt].gguf_head
    if shape[-1] % GGUF_BLOCK:
        raise ValueError(f"{where}: rows of {shape[-1]} are not whole blocks of {GGUF_BLOCK}.")
    blocks = math.prod(shape) // GGUF_BLOCK
    block_bytes = head + GGUF_BLOCK * FORMATS[fmt].bits // 8
    if data.dtype != np.uint8 or data.size != blocks * block_bytes:
        raise ValueError(f"{where} holds {data.size} {data.dtype} values; its {blocks} blocks take "
                         f"{blocks * block_bytes} uint8 bytes.")
    raw = data.reshape(*shape[:-1], shape[-1] // GGUF_BLOCK, block_bytes)
    half = lambda k: np.ascontiguousarray(raw[..., 2 * k:2 * k + 2]).view(np.float16)[..., 0]  # noqa: E731
    per_block = [half(0), half(1)] if fmt == "q4_1" else [half(0)]
    if not all(np.isfinite(a).all() for a in per_block):
        raise ValueError(f"{where}: block scales hold NaN or inf; the file is damaged.")
    codes = np.ascontiguousarray(raw[..., head:]).reshape(*shape[:-1], -1)
    codes = codes.view(np.int8) if fmt == "q8_0" else codes
    return QuantizedArray(jnp.asarray(codes), jnp.asarray(per_block[0]),
                          jnp.asarray(per_block[1]) if fmt == "q4_1" else None,
                          fmt=fmt, block=GGUF_BLOCK, axis=-1, dtype=np.dtype(np.float32))


def _gguf_header(tensor: Any) -> tuple[str, str, tuple[int, ...]]:
    """A GGUF tensor's name, type name and NumPy shape, checked."""
    missing = [field for field in ("name", "tensor_type", "shape", "data") if not hasattr(tensor, field)]
    if missing:
        raise TypeError(f"lorax.gguf_tensor: expected a gguf.GGUFReader tensor (name, tensor_type, shape, data), "
                        f"got a {type(tensor).__name__} without {', '.join(missing)}.")
    name, kind = tensor.name, getattr(tensor.tensor_type, "name", None)
    if not isinstance(kind, str):
        raise TypeError(f"lorax.gguf_tensor: {name!r}: tensor_type must be a gguf.GGMLQuantizationType, "
                        f"got {tensor.tensor_type!r}.")
    dims = np.asarray(tensor.shape)
    if dims.ndim != 1 or dims.size == 0:
        raise ValueError(f"lorax.gguf_tensor: {name!r}: shape must list its dimensions, got {tensor.shape!r}.")
    shape = [index(n, f"lorax.gguf_tensor: {name!r}: shape[{i}]", minimum=1) for i, n in enumerate(dims)]
    return name, kind, tuple(reversed(shape))


# ----------------------------------------------------------------------------- merging


def merge_quantized(params: Any) -> tuple[Any, dict[str, float]]:
    """Merge each adapter over a quantized (or `Bf16Bits`) base and quantize the result again in
    the base's format; returns the tree and, per merged weight, the rounding error
    ``‖requantized - merged‖ / ‖merged‖``. (`lorax.merge` gives the full-precision merge.)
    A merged weight holding NaN or inf, or too large for its format's fp16 scales, is refused
    as in `quantize`.

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
            again = encode(merged, q.fmt, q.block, q.axis, double_quant=isinstance(q.scale, QuantizedArray), path=path,
                           who="lorax.merge_quantized")
            diff = again.dequantize().astype(jnp.float32) - merged.astype(jnp.float32)
            errors[path] = float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(merged.astype(jnp.float32)),
                                                                      1e-30))
            return again
        if isinstance(leaf, Adapter) and isinstance(leaf.w, Bf16Bits):
            leaf.check(path)
            merged = leaf.replace(w=leaf.w.dequantize()).merged().astype(jnp.float32)
            again = held_as_bits(merged, f"lorax.merge_quantized: {path!r} (shape {tuple(merged.shape)})")
            diff = again.dequantize().astype(jnp.float32) - merged
            errors[path] = float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(merged), 1e-30))
            return again
        if isinstance(leaf, Adapter):
            return leaf.merged()
        return leaf.value if isinstance(leaf, Trainable) else leaf

    return _map(one, params), errors

