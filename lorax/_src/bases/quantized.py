"""`QuantizedArray`: a frozen weight stored as integer codes and per-block scales.

Blocks run along one axis of the weight (``axis``, counted from the end, so slicing leading
stacked axes keeps it right); every other axis is the weight's own, so the codes, scales
and offsets have the weight's rank and are sliced, stacked, transposed and sharded like it.
4-bit codes are packed two per byte along the block axis, llama.cpp's way: in each block
the low nibbles hold its first half, the high nibbles its second.

Formats (``fmt``): `lorax._src.bases.formats`.

Inside `lorax.lora` a quantized weight is dequantized at each use (`lorax_product` for a
matmul, convolution or lookup; views of it stay quantized), so a training step takes only
the codes as arguments and never holds a full-precision copy between steps.

>>> import jax.numpy as jnp, lorax
>>> q = lorax.quantize({"w": jnp.linspace(-1, 1, 128).reshape(2, 64)}, "nf4")["w"]
>>> q.shape, q.codes.shape, q.scale.shape, float(abs(q.dequantize()).max())
((2, 64), (2, 32), (2, 1), 1.0)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from lorax._src import compat
from lorax._src.bases.at_use import product_at_use
from lorax._src.bases.bits import Bf16Bits
from lorax._src.bases.formats import FORMATS, Format
from lorax._src.validate import index


def _static(default: Any = dataclasses.MISSING) -> Any:
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A weight of ``shape``/``dtype`` held as ``codes`` (uint8) with one ``scale`` (and, for
    affine formats, one ``offset``) per block of ``block`` values along axis ``axis``.

    Build one with `lorax.quantize` or `lorax.gguf_tensor`; read it back with `dequantize`.
    It stands wherever the weight did (as an adapter's frozen ``w`` too): inside `lorax.lora`
    each use dequantizes it. The layout is checked on construction.

    Attributes:
      codes: the codes, uint8 (int8 for ``"int8"`` and ``"q8_0"``); 4-bit formats pack two
        codes a byte along ``axis``.
      scale: one scale per block, the block axis of length ``shape[axis] // block``; itself a
        `QuantizedArray` for NF4 with ``double_quant``.
      offset: one offset per block for the affine formats (``"q4_1"``), else None.
      fmt: ``"nf4"``, ``"int8"``, ``"q4_0"``, ``"q4_1"`` or ``"q8_0"`` (``"u8"``: the 8-bit
        scales of double quantization).
      block: values per block: a positive int, even for 4-bit codes, 32 for the GGUF formats.
      axis: the block axis, a negative int (counted from the end).
      dtype: the floating dtype `dequantize` returns.

    >>> import jax.numpy as jnp, lorax
    >>> q = lorax.quantize({"w": jnp.ones((4, 64))}, "nf4")["w"]
    >>> q
    QuantizedArray(nf4 float32[4, 64], block=64 along axis -1, 4.50 bits/value)
    >>> q.codes.shape, q.scale.shape, q.shape, q.dequantize().tolist()[0][:3]
    ((4, 32), (4, 1), (4, 64), [1.0, 1.0, 1.0])
    >>> lorax.QuantizedArray(jnp.zeros((2, 16), jnp.uint8), jnp.ones((2, 1)), fmt="q4_0", block=64)
    Traceback (most recent call last):
    ValueError: QuantizedArray: q4_0 stores blocks of 32, got block=64.
    """

    codes: Any
    scale: Any
    offset: Any = None
    fmt: str = _static("nf4")
    block: int = _static(64)
    axis: int = _static(-1)
    dtype: Any = _static(np.dtype(np.float32))

    def __post_init__(self):
        if not isinstance(self.fmt, str) or self.fmt not in FORMATS:
            raise ValueError(f"QuantizedArray: fmt must be one of {', '.join(FORMATS)}, got {self.fmt!r}.")
        block = index(self.block, "QuantizedArray: block", minimum=1)
        fixed, bits = FORMATS[self.fmt].block, FORMATS[self.fmt].bits
        if fixed not in (None, block) or block % (8 // bits):
            want = f"blocks of {fixed}" if fixed else "blocks of an even size (two codes a byte)"
            raise ValueError(f"QuantizedArray: {self.fmt} stores {want}, got block={block}.")
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral) or self.axis >= 0:
            raise ValueError(f"QuantizedArray: axis must be a negative int (the block axis counted from the end), "
                             f"got {self.axis!r}.")
        if not _is_float_dtype(self.dtype):
            raise ValueError(f"QuantizedArray: dtype must be a floating dtype, got {self.dtype!r}.")
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    @property
    def format(self) -> Format:
        """The format's entry in the table of quantized formats: bits, levels, encoder."""
        return FORMATS[self.fmt]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight (not of the packed codes)."""
        shape = list(self.codes.shape)
        shape[self.axis] *= 8 // self.format.bits
        return tuple(shape)

    @property
    def ndim(self) -> int:
        """The weight's number of axes."""
        return len(self.codes.shape)

    @property
    def size(self) -> int:
        """The weight's number of values."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def bits_per_value(self) -> float:
        """Bits held per weight value, scales and offsets included (4.5 for NF4 in blocks of 64)."""
        return 8 * self.nbytes / self.size

    def astype(self, dtype) -> QuantizedArray:
        """The same codes, dequantizing to ``dtype``."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def dequantize(self) -> jax.Array:
        """The weight, in ``dtype``: each code's level times its block's scale (plus its offset)."""
        fmt, k = self.format, self.axis % self.ndim
        codes = jnp.asarray(self.codes)
        shape = self.shape
        blocks = codes.reshape(*shape[:k], shape[k] // self.block, -1, *shape[k + 1:])  # in place: no transposes
        if fmt.bits == 4:
            blocks = jnp.concatenate([blocks & 15, blocks >> 4], axis=k + 1)
        per_block = lambda x: jnp.expand_dims(dense(x).astype(jnp.float32), k + 1)  # noqa: E731
        values = fmt.level(blocks) * per_block(self.scale)
        if fmt.affine:
            values = values + per_block(self.offset)
        return values.reshape(shape).astype(self.dtype)

    def transpose(self, permutation) -> QuantizedArray:
        """The codes of ``dequantize().transpose(permutation)`` (blocks keep their axis)."""
        permutation = [p % self.ndim for p in permutation]
        axis = permutation.index(self.axis % self.ndim) - self.ndim
        return self.map_arrays(lambda x: jnp.transpose(x, permutation), axis)

    def map_arrays(self, fn: Callable[[Any], Any], axis: int | None = None) -> QuantizedArray:
        """``fn`` applied to the codes, scales and offsets alike (an operation on axes other
        than the block axis: stacking, slicing or permuting rows); ``axis`` the block axis after."""
        axis = self.axis if axis is None else axis
        scale = self.scale.map_arrays(fn, axis) if isinstance(self.scale, QuantizedArray) else fn(self.scale)
        return self.replace(codes=fn(self.codes), scale=scale,
                            offset=None if self.offset is None else fn(self.offset), axis=axis)

    def replace(self, **changes) -> QuantizedArray:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        return (f"QuantizedArray({self.fmt} {jnp.dtype(self.dtype).name}{list(self.shape)}, block={self.block} "
                f"along axis {self.axis}, {self.bits_per_value():.2f} bits/value)")

    # ------------------------------------------------------------------ inside lorax.lora

    def lorax_product(self, eqn, operands: list, position: int,
                      bind: Callable[[Any, list], jax.Array] | None = None) -> jax.Array:
        """The frozen product with this weight at ``operands[position]``, dequantized here (XLA
        may fuse the dequantization into the product). Under ``jax.checkpoint``: the backward
        dequantizes again rather than keep the full-precision weight as a residual (in a
        ``scan``, every layer's). A lookup of whole rows (an embedding) gathers the rows' codes
        and scales and dequantizes those rows alone. ``bind(eqn, operands)`` evaluates the
        product on the dequantized weight (by default, the equation itself)."""
        rows = self._rows(eqn, operands, position)
        return product_at_use(self, eqn, operands, position, bind) if rows is None else rows.dequantize()

    def _rows(self, eqn, operands: list, position: int) -> QuantizedArray | None:
        """The rows a ``gather`` looks up, still quantized, where it takes every block axis
        whole and keeps it last (``jnp.take(table, ids, axis=0)``); else None."""
        if eqn.primitive.name != "gather" or position != 0:
            return None
        numbers, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
        last, out_last = self.ndim - 1, len(eqn.outvars[0].aval.shape) - 1
        if (self.axis != -1 or sizes[last] != self.shape[last] or last in numbers.collapsed_slice_dims
                or not numbers.offset_dims or numbers.offset_dims[-1] != out_last):
            return None
        def gather(x):  # an index out of range fills the codes with 0 and the scales as the lookup fills values
            fill = eqn.params.get("fill_value") if jnp.issubdtype(x.dtype, jnp.floating) else 0
            return compat.bind(eqn, [x, operands[1]], slice_sizes=(*sizes[:last], x.shape[last]), fill_value=fill)[0]

        return self.map_arrays(gather)


def _is_float_dtype(dtype: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        return False


FROZEN_BASES = (QuantizedArray, Bf16Bits)  # the frozen bases that are not plain arrays


def is_frozen_base(x: Any) -> TypeGuard[QuantizedArray | Bf16Bits]:
    """Whether ``x`` is a frozen base that is not a plain array: a `QuantizedArray` or a `lorax.Bf16Bits`."""
    return isinstance(x, FROZEN_BASES)


def format_of(w: Any) -> str | None:
    """A frozen base's quantized format (``"nf4"``, ``"q4_1"``, ...), or None for a plain array.

    >>> import jax.numpy as jnp, lorax
    >>> format_of(lorax.quantize({"w": jnp.ones((2, 64))}, "nf4")["w"]), format_of(jnp.ones(3))
    ('nf4', None)
    """
    return w.fmt if isinstance(w, QuantizedArray) else None


def stored(w: Any) -> Any:
    """The array a frozen base keeps its values in, whose devices and sharding are the base's: a
    quantized base's codes, a plain array itself.

    >>> import jax.numpy as jnp, lorax
    >>> stored(lorax.quantize({"w": jnp.ones((2, 64))}, "nf4")["w"]).dtype, stored(jnp.ones(3)).shape
    (dtype('uint8'), (3,))
    """
    return w.codes if isinstance(w, QuantizedArray) else w.bits if isinstance(w, Bf16Bits) else w


def dense(x: Any) -> Any:
    """``x`` dequantized if it is a `QuantizedArray` (or reinterpreted if it is a bf16 weight
    carried as bits through a scan), else as is: a frozen base's dense value.

    >>> import jax.numpy as jnp, lorax
    >>> from lorax.extend import dense
    >>> w = jnp.linspace(-1, 1, 64).reshape(2, 32)
    >>> q = lorax.quantize({"w": w}, "int8")["w"]
    >>> dense(q).shape, float(jnp.abs(dense(q) - w).max()) < 0.01, dense(w) is w
    ((2, 32), True, True)
    """
    return x.dequantize() if isinstance(x, QuantizedArray | Bf16Bits) else x
