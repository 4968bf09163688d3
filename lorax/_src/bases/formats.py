"""The quantized formats, one table: how each reads (``level``) and writes (``encode``) its codes,
and the GGUF block type it is stored as.

Formats (``fmt``; the value of code ``q`` in a block with scale ``d`` and offset ``m``):

- ``"nf4"``: QLoRA's NormalFloat-4 (Dettmers et al. 2023), ``NF4[q]·d``, ``d`` the fp32 absmax
  of 64 values (or itself quantized: ``double_quant``);
- ``"int8"``: ``q·d``, one fp32 ``d`` per output channel (the block is the whole input axis);
- ``"q4_0"``, ``"q4_1"``, ``"q8_0"``: GGUF blocks of 32 as stored in the file: ``(q-8)·d``,
  ``q·d + m`` and ``q·d`` with fp16 ``d`` and ``m``;
- ``"u8"``: ``q·d + m``, 8-bit affine; what a double-quantized NF4 stores its absmax in.

>>> from lorax._src.bases.formats import FORMATS, GGUF_TYPES
>>> FORMATS["q4_1"].bits, FORMATS["q4_1"].affine, FORMATS["q4_1"].gguf_head, GGUF_TYPES["Q4_1"]
(4, True, 4, 'q4_1')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA,
# appendix E; the values bitsandbytes uses).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

GGUF_BLOCK = 32  # values per block of every GGUF block type
FP16_MAX = float(np.finfo(np.float16).max)

Encoder = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array | None]]


@dataclasses.dataclass(frozen=True)
class Format:
    """One format: ``bits`` per code, the ``level`` each code stands for, and ``encode``, which
    turns fp32 blocks ``[..., n, block]`` into codes, scales and offsets (None if not affine).

    Attributes:
      affine: an offset per block (value = level·d + m).
      block: the fixed block size (GGUF), or None.
      gguf: the GGUF tensor type this format is stored as, or None.
      largest: the largest magnitude the format holds before its fp16 scale overflows, or None.
      made_by_quantize: whether `lorax.quantize` writes it (``u8`` holds double-quantized scales only).
    """

    bits: int
    level: Callable[[jax.Array], jax.Array]
    encode: Encoder
    affine: bool = False
    block: int | None = None
    gguf: str | None = None
    largest: float | None = None
    made_by_quantize: bool = True

    @property
    def gguf_head(self) -> int:
        """Bytes before a GGUF block's codes: its fp16 scale, and its fp16 minimum if affine."""
        return 2 * (1 + self.affine)


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


FORMATS: dict[str, Format] = {
    "nf4": Format(4, lambda q: lax.select_n(q.astype(jnp.int32), *(jnp.full(q.shape, v) for v in NF4)), _nf4),
    "int8": Format(8, lambda q: q.astype(jnp.int8).astype(jnp.float32), _symmetric8(jnp.float32)),
    # q4_0's scale is the block's absmax / 8, q8_0's its absmax / 127; q4_1 stores the block's minimum itself
    "q4_0": Format(4, lambda q: q.astype(jnp.float32) - 8.0, _q4_0, block=GGUF_BLOCK, gguf="Q4_0",
                   largest=8 * FP16_MAX),
    "q4_1": Format(4, lambda q: q.astype(jnp.float32), _affine(15, jnp.float16), affine=True, block=GGUF_BLOCK,
                   gguf="Q4_1", largest=FP16_MAX),
    "q8_0": Format(8, lambda q: q.astype(jnp.int8).astype(jnp.float32), _symmetric8(jnp.float16), block=GGUF_BLOCK,
                   gguf="Q8_0", largest=127 * FP16_MAX),
    "u8": Format(8, lambda q: q.astype(jnp.float32), _affine(255, jnp.float32), affine=True, made_by_quantize=False),
}
GGUF_TYPES = {f.gguf: name for name, f in FORMATS.items() if f.gguf}  # GGUF tensor type -> format
