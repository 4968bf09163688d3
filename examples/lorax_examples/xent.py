"""The training loss of a tied head, computed with its gradient in one pass over token blocks.

`fused_xent(x, table, targets)` is the mean cross-entropy of the logits ``x·tableᵀ`` against
``targets``. Differentiated, its forward also computes the gradient to ``x`` (and to ``table``
where that is trained), ``rows`` tokens at a time: each block's logits (``rows × vocab``, 25
MiB for SmolLM2 at 128 rows) are made, reduced and turned into that block's share of the
gradient while they are in cache, and never held whole. What the backward keeps is the
gradient itself (``x``'s shape), not ``[tokens, vocab]`` logits or probabilities, and the
backward only scales it by the incoming cotangent. Same flops as the plain head and loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lorax_examples.products import cast_dot

ROWS = 128  # tokens per block: a block's fp32 logits stay in a 32 MiB L3 at SmolLM2's vocabulary


def fused_xent(x: jax.Array, table: jax.Array, targets: jax.Array, dtype=None, rows: int = ROWS) -> jax.Array:
    """Mean cross-entropy of ``x·tableᵀ`` (``x`` [..., dim], ``table`` [vocab, dim]) against the
    integer ``targets`` [...]; with ``dtype``, the products take operands of that dtype and
    accumulate in fp32 (`lorax_examples.products.cast_dot`). ``targets`` lie in ``[0, vocab)``
    (values, so unchecked under `jax.jit`). A custom derivative: reverse mode (`jax.grad`,
    `jax.vjp`) only, as `lorax.lora`'s bf16 backward.

    >>> import jax, jax.numpy as jnp, optax
    >>> x, table = jax.random.normal(jax.random.key(0), (2, 3, 8)), jax.random.normal(jax.random.key(1), (16, 8))
    >>> targets = jnp.array([[1, 5, 15], [0, 8, 9]])
    >>> plain = lambda x: optax.softmax_cross_entropy_with_integer_labels(x @ table.T, targets).mean()
    >>> bool(jnp.allclose(fused_xent(x, table, targets, rows=4), plain(x), atol=1e-5))
    True
    >>> bool(jnp.allclose(jax.grad(fused_xent)(x, table, targets), jax.grad(plain)(x), atol=1e-6))
    True
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"fused_xent: rows takes a positive int, got {rows!r}")
    if x.shape[:-1] != targets.shape or table.ndim != 2 or table.shape[1] != x.shape[-1]:
        raise ValueError(f"fused_xent: x {x.shape}, table {table.shape} and targets {targets.shape} do not fit: "
                         "expected x [..., dim], table [vocab, dim], targets x's shape without dim")
    with jax.named_scope("fused_xent"):  # a name for profiles (`benchmarks/profile_step.py`)
        return _xent(dtype, rows, x, table, targets)


def _blocks(dtype, rows, x, table, targets, want_x: bool, want_table: bool):
    """(loss, gradient to x or None, gradient to table or None), ``rows`` tokens at a time."""
    flat, picked_ids = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    n = picked_ids.shape[0]
    rows = min(rows, n)  # fewer tokens than a block: one block of them, nothing padded
    pad = -n % rows
    flat = jnp.pad(flat, ((0, pad), (0, 0)))
    picked_ids = jnp.pad(picked_ids, (0, pad), constant_values=-1)  # -1: a padding row, weighted 0

    def block(table_grad, xs):
        xb, ids = xs
        logits = cast_dot(xb, table, (((1,), (1,)), ((), ())), dtype)
        top = logits.max(-1)
        exp = jnp.exp(logits - top[:, None])
        total = exp.sum(-1)
        picked = jnp.take_along_axis(logits, jnp.maximum(ids, 0)[:, None], axis=1)[:, 0]
        real = ids >= 0
        loss = jnp.where(real, jnp.log(total) + top - picked, 0.0).sum()
        if not (want_x or want_table):
            return table_grad, (loss, None)
        hit = ids[:, None] == jax.lax.broadcasted_iota(ids.dtype, logits.shape, 1)
        g = (exp / total[:, None] - hit) * (real / n)[:, None]  # d loss / d logits of this block
        x_grad = cast_dot(g, table, (((1,), (0,)), ((), ())), dtype) if want_x else None
        if want_table:
            table_grad = table_grad + cast_dot(g, xb, (((0,), (0,)), ((), ())), dtype)
        return table_grad, (loss, x_grad)

    start = jnp.zeros(table.shape, jnp.float32) if want_table else None
    table_grad, (losses, x_grad) = jax.lax.scan(block, start, (flat.reshape(-1, rows, flat.shape[1]),
                                                              picked_ids.reshape(-1, rows)))
    if x_grad is not None:
        x_grad = x_grad.reshape(-1, x.shape[-1])[:n].reshape(x.shape).astype(x.dtype)
    if table_grad is not None:
        table_grad = table_grad.astype(table.dtype)
    return losses.sum() / n, x_grad, table_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _xent(dtype, rows, x, table, targets):
    return _blocks(dtype, rows, x, table, targets, False, False)[0]


def _xent_fwd(dtype, rows, x, table, targets):
    loss, x_grad, table_grad = _blocks(dtype, rows, x.value, table.value, targets.value, x.perturbed, table.perturbed)
    return loss, (x_grad, table_grad)


def _xent_bwd(dtype, rows, grads, g):
    if isinstance(g, SymbolicZero):
        return None, None, None
    x_grad, table_grad = grads
    scaled = lambda grad: None if grad is None else (g * grad).astype(grad.dtype)  # noqa: E731
    return scaled(x_grad), scaled(table_grad), None


_xent.defvjp(_xent_fwd, _xent_bwd, symbolic_zeros=True)
