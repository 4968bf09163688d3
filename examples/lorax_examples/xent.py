"""The training loss of a tied head, computed with its gradient in one pass over token blocks.

`fused_xent(x, table, targets)` is the mean cross-entropy of the logits ``x·tableᵀ`` against
``targets``. Differentiated, its forward also computes the gradient to ``x`` (and to ``table``
where that is trained), ``rows`` tokens at a time, and never holds ``[tokens, vocab]`` logits:
what the backward keeps is the gradient itself (``x``'s shape), and the backward only scales it
by the incoming cotangent. Same flops as the plain head and loss.

With the table frozen, each block reads the table once, in chunks of `VOCAB_CHUNK` rows, as
attention reads its keys and values in flash attention: a running maximum and sum of the
exponentials give the softmax's normaliser, and the gradient to ``x``, ``softmax·table −
table[target]``, is summed chunk by chunk (rescaled as the maximum grows) while the chunk is in
cache. It is summed as ``Σ_{i≠target} p_i·(table[i] − table[target])``: the target's own row
stays out of the product, so a confident prediction (``p_target`` near 1) does not leave the
gradient as the small difference of two large vectors, one rounded to the products' bf16.
A trained table needs every logit's final probability for its own gradient, so its blocks make
their whole ``rows × vocab`` logits (25 MiB for SmolLM2 at 128 rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lorax_examples.products import bf16_bits, bf16_of_bits, cast_dot

ROWS = 512  # tokens per block over a frozen table: the table read once per 512 tokens
VOCAB_CHUNK = 2048  # table rows per chunk: a block's [512, 2048] fp32 logits stay in cache
TABLE_ROWS = 128  # tokens per block with the table trained: its fp32 logits stay in a 32 MiB L3 at SmolLM2's vocabulary


def fused_xent(x: jax.Array, table: jax.Array, targets: jax.Array, dtype=None, rows: int | None = None) -> jax.Array:
    """Mean cross-entropy of ``x·tableᵀ`` (``x`` [..., dim], ``table`` [vocab, dim]) against the
    integer ``targets`` [...]; with ``dtype``, the products take operands of that dtype and
    accumulate in fp32 (`lorax_examples.products.cast_dot`). ``targets`` lie in ``[0, vocab)``
    (values, so unchecked under `jax.jit`). A custom derivative: reverse mode (`jax.grad`,
    `jax.vjp`) only, as `lorax.lora`'s bf16 backward. ``rows``: tokens per block (`ROWS` over a
    frozen table, `TABLE_ROWS` with the table trained).

    >>> import jax, jax.numpy as jnp, optax
    >>> x, table = jax.random.normal(jax.random.key(0), (2, 3, 8)), jax.random.normal(jax.random.key(1), (16, 8))
    >>> targets = jnp.array([[1, 5, 15], [0, 8, 9]])
    >>> plain = lambda x: optax.softmax_cross_entropy_with_integer_labels(x @ table.T, targets).mean()
    >>> bool(jnp.allclose(fused_xent(x, table, targets, rows=4), plain(x), atol=1e-5))
    True
    >>> bool(jnp.allclose(jax.grad(fused_xent)(x, table, targets), jax.grad(plain)(x), atol=1e-6))
    True
    """
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
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
    blocks = -(-n // (rows or (TABLE_ROWS if want_table else ROWS)))
    rows = -(-n // blocks)  # blocks of equal size: fewer than `blocks` padding rows in all
    pad = blocks * rows - n
    flat = jnp.pad(flat, ((0, pad), (0, 0)))
    picked_ids = jnp.pad(picked_ids, (0, pad), constant_values=-1)  # -1: a padding row, weighted 0
    if want_table:
        block = functools.partial(_block_over_whole_vocab, dtype, table, n, want_x)
    else:  # made once, outside the loop over blocks
        block = functools.partial(_block_over_vocab_chunks, dtype, *_sliceable(table, dtype), n, want_x)
    start = jnp.zeros(table.shape, jnp.float32) if want_table else None
    table_grad, (losses, x_grad) = jax.lax.scan(block, start, (flat.reshape(-1, rows, flat.shape[1]),
                                                              picked_ids.reshape(-1, rows)))
    if x_grad is not None:
        x_grad = x_grad.reshape(-1, x.shape[-1])[:n].reshape(x.shape).astype(x.dtype)
    if table_grad is not None:
        table_grad = table_grad.astype(table.dtype)
    return losses.sum() / n, x_grad, table_grad


def _block_over_whole_vocab(dtype, table, n, want_x, table_grad, xs):
    """One block's loss and gradients from its whole ``[rows, vocab]`` logits (the table trained)."""
    xb, ids = xs
    logits = cast_dot(xb, table, (((1,), (1,)), ((), ())), dtype)
    top = logits.max(-1)
    exp = jnp.exp(logits - top[:, None])
    total = exp.sum(-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(ids, 0)[:, None], axis=1)[:, 0]
    real = ids >= 0
    loss = jnp.where(real, jnp.log(total) + top - picked, 0.0).sum()
    hit = ids[:, None] == jax.lax.broadcasted_iota(ids.dtype, logits.shape, 1)
    g = (exp / total[:, None] - hit) * (real / n)[:, None]  # d loss / d logits of this block
    x_grad = cast_dot(g, table, (((1,), (0,)), ((), ())), dtype) if want_x else None
    return table_grad + cast_dot(g, xb, (((0,), (0,)), ((), ())), dtype), (loss, x_grad)


def sliced_in_chunks(vocab: int) -> bool:
    """Whether the loss reads a frozen table of ``vocab`` rows in slices: more than one chunk.

    >>> sliced_in_chunks(VOCAB_CHUNK), sliced_in_chunks(VOCAB_CHUNK + 1)
    (False, True)
    """
    return vocab > VOCAB_CHUNK


def _sliceable(table, dtype):
    """``(held, values)``: ``table`` in the products' dtype, held as its bits when it is bf16 and
    read in more than one chunk (XLA:CPU slices bf16 in a loop from an fp32 copy of the whole
    array; bits slice as they are), and the function turning rows of ``held`` into values."""
    table = table if dtype is None else table.astype(dtype)  # a dequantized table cast whole, once per step
    if table.dtype != jnp.bfloat16 or not sliced_in_chunks(table.shape[0]):
        return table, lambda rows: rows
    return bf16_bits(table), bf16_of_bits


def _block_over_vocab_chunks(dtype, held, values, n, want_x, _, xs):
    """One block's loss and gradient to x, the (frozen) table (`_sliceable`) read once,
    `VOCAB_CHUNK` rows at a time."""
    xb, ids = xs
    chunk, vocab = VOCAB_CHUNK, held.shape[0]

    def add_chunk(carry, rows_of_table, first_row):
        top, total, others, acc = carry
        logits = cast_dot(xb, rows_of_table, (((1,), (1,)), ((), ())), dtype)
        new_top = jnp.maximum(top, logits.max(-1))
        rescale = jnp.exp(top - new_top)  # 0 at the first chunk, whose running maximum is -inf
        exp = jnp.exp(logits - new_top[:, None])
        total = total * rescale + exp.sum(-1)
        if want_x:  # the softmax's numerator over the other rows, and times the table, chunk by chunk
            target = (ids - first_row)[:, None] == jax.lax.broadcasted_iota(ids.dtype, exp.shape, 1)
            exp = jnp.where(target, 0.0, exp)
            others = others * rescale + exp.sum(-1)
            acc = acc * rescale[:, None] + cast_dot(exp, rows_of_table, (((1,), (0,)), ((), ())), dtype)
        return (new_top, total, others, acc), None

    rows = xb.shape[0]
    start = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros(rows),
             jnp.zeros(xb.shape, jnp.float32) if want_x else None)
    if not sliced_in_chunks(vocab):  # one chunk: the table as it is, not a slice of it
        carry, _ = add_chunk(start, values(held), 0)
    else:
        rows_at = lambda i: values(jax.lax.dynamic_slice_in_dim(held, i * chunk, chunk))  # noqa: E731
        carry, _ = jax.lax.scan(lambda c, i: add_chunk(c, rows_at(i), i * chunk), start, jnp.arange(vocab // chunk))
        if vocab % chunk:  # the rows after the last whole chunk
            carry, _ = add_chunk(carry, values(held[vocab - vocab % chunk:]), vocab - vocab % chunk)
    top, total, others, acc = carry
    target_rows = values(held[jnp.maximum(ids, 0)]).astype(jnp.float32)
    rounded = xb if dtype is None else xb.astype(dtype)  # x as the products round it
    picked = jnp.sum(rounded.astype(jnp.float32) * target_rows, -1)
    real = ids >= 0
    loss = jnp.where(real, jnp.log(total) + top - picked, 0.0).sum()
    if not want_x:
        return None, (loss, None)
    # Σ_i p_i·table[i] − table[target] = Σ_{i≠target} p_i·(table[i] − table[target])
    return None, (loss, (acc - others[:, None] * target_rows) / total[:, None] * (real / n)[:, None])


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
