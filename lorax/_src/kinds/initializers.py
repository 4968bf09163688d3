"""How the low-rank factors start: ``LoraConfig(init=...)``.

- ``"kaiming_uniform"`` (PEFT's default): ``a ~ U(±1/sqrt(fan_in))``, ``b = 0``;
- ``"gaussian"``: ``a ~ N(0, 1/r²)``, ``b = 0``;
- ``"pissa"`` (Meng et al. 2024): ``a``, ``b`` from the top-r singular triplets of W, the
  frozen base becomes the residual ``W - s·a·b``; ``"pissa_niter_K"`` uses a randomized
  SVD with K subspace iterations, for big weights;
- ``"olora"`` (Büyükakyüz 2024): ``a``, ``b`` from a QR decomposition of W, base the residual.

In every case the model's outputs are unchanged at initialisation. Stacked layers get one
decomposition each.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from lorax._src.kinds.adapter import Axes, as_matrices, fan_in_out

INITS = ("kaiming_uniform", "gaussian", "pissa", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")
_SKETCH_KEY = 0  # the randomized SVD's sketch is fixed, so a residual can be rebuilt from W alone


def valid_init(name: object) -> bool:
    return isinstance(name, str) and (name in INITS or _NITER.fullmatch(name) is not None)


def makes_residual(init: str) -> bool:
    """Whether ``init`` replaces the frozen base by a residual (PiSSA, OLoRA)."""
    return init not in ("kaiming_uniform", "gaussian")


def residual(init: str, w: jax.Array, a_axes: Axes, b_axes: Axes, stack_axes: Axes, rank: int,
             scale: float) -> jax.Array:
    """The frozen base that ``init`` makes of the original weight ``w``: deterministic, so a
    checkpoint (which holds only the trained arrays) is restored onto the original base."""
    return low_rank_init(jax.random.key(_SKETCH_KEY), init, w, a_axes, b_axes, stack_axes, rank, scale, w.dtype)[0]


def low_rank_init(key: jax.Array, init: str, w: jax.Array, a_axes: Axes, b_axes: Axes,
                  stack_axes: Axes, rank: int, scale: float, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(base, a, b)``: the frozen base (W, or its residual) and the factors laid out as
    ``(*stack, *a_axes, r)`` and ``(*stack, r, *b_axes)``."""
    stack = tuple(w.shape[i] for i in stack_axes)
    a_shape = (*stack, *(w.shape[i] for i in a_axes), rank)
    b_shape = (*stack, rank, *(w.shape[i] for i in b_axes))
    if init in ("kaiming_uniform", "gaussian"):
        if init == "gaussian":
            a = jax.random.normal(key, a_shape, dtype) / rank
        else:  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in_out(w.shape, a_axes, b_axes)[0])
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        return w, a, jnp.zeros(b_shape, dtype)

    m = as_matrices(w, a_axes, b_axes, stack_axes).astype(jnp.float32)
    if init == "olora":  # torch's W [out, in] = Q·R: b = Q[:, :r]ᵀ, a = R[:r]ᵀ
        q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
        a, b = jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :rank], -1, -2)
    else:  # W = U·S·Vᵀ: s·a·b = U_r·S_r·V_rᵀ
        niter = _NITER.fullmatch(init)
        u, s, vt = (_randomized_svd(jax.random.key(_SKETCH_KEY), m, rank, int(niter.group(1))) if niter
                    else jnp.linalg.svd(m, full_matrices=False))
        root = jnp.sqrt(s[..., :rank] / scale)
        a, b = u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]
    residual = m - scale * a @ b
    order = (*stack_axes, *a_axes, *b_axes)
    residual = residual.reshape(tuple(w.shape[i] for i in order))
    base = jnp.transpose(residual, [order.index(i) for i in range(w.ndim)]).astype(w.dtype)
    return base, a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)


def _randomized_svd(key: jax.Array, m: jax.Array, rank: int, niter: int):
    """Top singular triplets of the matrices ``m [..., in, out]`` (Halko et al. 2011)."""
    width = min(2 * rank, *m.shape[-2:])
    y = m @ jax.random.normal(key, (*m.shape[:-2], m.shape[-1], width), m.dtype)
    q = jnp.linalg.qr(y)[0]
    for _ in range(niter):
        q = jnp.linalg.qr(m @ jnp.linalg.qr(jnp.swapaxes(m, -1, -2) @ q)[0])[0]
    u, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
    return q @ u, s, vt
