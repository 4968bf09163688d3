"""The tied head's fused loss (`lorax_examples.xent.fused_xent`): the plain head and loss's value
and gradients, to x and to the table, in any block size; no [tokens, vocab] array kept for the
backward; bad arguments refused."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import with_random_b
from lorax_examples import xent
from lorax_examples.llama import Llama, LlamaConfig
from lorax_examples.xent import fused_xent

import lorax

X = jax.random.normal(jax.random.key(0), (3, 7, 16))
TABLE = jax.random.normal(jax.random.key(1), (40, 16))
TARGETS = jax.random.randint(jax.random.key(2), (3, 7), 0, 40)


def plain(x, table, targets, dtype=None):
    if dtype is not None:
        x, table = x.astype(dtype), table.astype(dtype)
    logits = jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("rows", [1, 4, 21, 128])  # 21 tokens: blocks that divide them, and padded ones
def test_value_and_both_gradients_are_the_plain_losss(rows):
    fused = lambda x, table: fused_xent(x, table, TARGETS, rows=rows)  # noqa: E731
    got = jax.value_and_grad(fused, argnums=(0, 1))(X, TABLE)
    want = jax.value_and_grad(lambda x, table: plain(x, table, TARGETS), argnums=(0, 1))(X, TABLE)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1]):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, atol=1e-6 * float(jnp.abs(w).max()))
    assert float(jnp.abs(want[1][0]).max()) > 1e-3


@pytest.mark.parametrize("chunk", [8, 16, 40, 64])  # 40 table rows: whole chunks, whole chunks and a rest, one chunk
@pytest.mark.parametrize("rows", [5, 21, None])
def test_a_frozen_table_read_in_chunks_gives_the_plain_losss_value_and_gradient(monkeypatch, chunk, rows):
    monkeypatch.setattr(xent, "VOCAB_CHUNK", chunk)
    got = jax.value_and_grad(lambda x: fused_xent(x, TABLE, TARGETS, rows=rows))(X)
    want = jax.value_and_grad(lambda x: plain(x, TABLE, TARGETS))(X)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6 * float(jnp.abs(want[1]).max()))
    np.testing.assert_allclose(fused_xent(X, TABLE, TARGETS, rows=rows), want[0], rtol=1e-6)  # the loss alone
    bf16 = jax.value_and_grad(lambda x: fused_xent(x, TABLE.astype(jnp.bfloat16), TARGETS, jnp.bfloat16, rows=rows))(X)
    want = jax.value_and_grad(lambda x: plain(x, TABLE, TARGETS, jnp.bfloat16))(X)
    np.testing.assert_allclose(bf16[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(bf16[1], want[1], atol=1e-2 * float(jnp.abs(want[1]).max()))


def test_a_frozen_tables_chunks_follow_a_growing_maximum():
    """Logits that grow by hundreds from chunk to chunk, so each chunk's maximum replaces the last:
    the sums kept so far are right only if rescaled to it, and an exponential taken against a
    stale maximum would overflow."""
    table = jnp.arange(40.0)[:, None] * jnp.ones((40, 16)) * 10.0
    x, targets = jnp.ones((1, 3, 16)), jnp.array([[39, 0, 20]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xent, "VOCAB_CHUNK", 8)
        got = jax.value_and_grad(lambda x: fused_xent(x, table, targets))(x)
    want = jax.value_and_grad(lambda x: plain(x, table, targets))(x)
    assert np.isfinite(float(got[0])) and float(want[0]) > 1000
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6 * float(jnp.abs(want[1]).max()))


def test_a_frozen_bf16_table_is_read_in_chunks_without_an_fp32_copy():
    """XLA:CPU slices (or gathers from) bf16 in a loop from an fp32 copy of the whole array (17
    MiB here): the chunks, the rows after the last whole chunk and the targets' rows are read
    from the table's bits, made once outside the loop over token blocks; `lorax.Bf16Bits` hands
    the bits over as they are (a plain bf16 argument costs one copy of its bits, 8.5 MiB)."""
    x = jax.random.normal(jax.random.key(0), (1, 600, 256))  # two blocks of 300 tokens
    table = jax.random.normal(jax.random.key(1), (17384, 256)).astype(jnp.bfloat16)  # 8 chunks and 984 rows
    targets = jax.random.randint(jax.random.key(2), (1, 600), 0, 17384)
    loss = lambda x, table: fused_xent(x, table, targets, jnp.bfloat16)  # noqa: E731
    held = lorax.quantize({"table": table}, "bf16")["table"]
    temps = {name: jax.jit(jax.grad(fn)).lower(x, t).compile().memory_analysis().temp_size_in_bytes / 2**20
             for name, fn, t in [("bf16", loss, table), ("bits", lorax.lora(loss), held)]}
    assert temps["bits"] < 8  # a block's chunk of logits and its exponentials, no copy of the table
    assert temps["bf16"] < 17  # and the bits of a plain bf16 table, not an fp32 copy
    np.testing.assert_array_equal(jax.grad(lorax.lora(loss))(x, held), jax.grad(loss)(x, table))


def test_bf16_operands_give_the_bf16_heads_loss_and_a_bf16_tables_gradient():
    table = TABLE.astype(jnp.bfloat16)
    got = jax.value_and_grad(lambda x, t: fused_xent(x, t, TARGETS, jnp.bfloat16, rows=8), argnums=(0, 1))(X, table)
    want = jax.value_and_grad(lambda x, t: plain(x, t, TARGETS, jnp.bfloat16), argnums=(0, 1))(X, table)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert got[1][0].dtype == jnp.float32 and got[1][1].dtype == jnp.bfloat16
    for g, w in zip(got[1], want[1]):  # the gradient's products take bf16 operands: bf16's precision
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), atol=1e-2 * float(jnp.abs(w).max()))


def test_a_confident_prediction_keeps_its_small_gradient_accurate_with_bf16_products(monkeypatch):
    """Tokens whose target takes nearly all the probability (p ≈ 1 − 3e-7) over a frozen bf16
    table read in two chunks and a rest: the gradient to x, ``Σ_{i≠t} p_i·(table[i] −
    table[t])``, is tiny beside ``table[t]``. Summed with the target's row left out of the bf16
    product it stays within 0.3% of the exact gradient of the same bf16-rounded operands; as
    ``softmax·table − table[t]`` it was 1.3% off."""
    monkeypatch.setattr(xent, "VOCAB_CHUNK", 2048)
    k = jax.random.split(jax.random.key(0), 3)
    vocab, n = 4096 + 512, 256
    table = (jax.random.normal(k[0], (vocab, 64)) / 4).astype(jnp.bfloat16)
    targets = jax.random.randint(k[1], (n,), 0, vocab)
    x = 12.0 * table[targets].astype(jnp.float32) + 0.3 * jax.random.normal(k[2], (n, 64))
    got = np.asarray(jax.grad(lambda x: fused_xent(x, table, targets, jnp.bfloat16))(x), np.float64)
    rounded, rows = (np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64) for a in (x, table))
    logits = rounded @ rows.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert p[np.arange(n), targets].mean() > 1 - 1e-6
    p[np.arange(n), targets] -= 1
    want = p @ rows / n
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-3


def test_the_cotangent_scales_the_gradient_and_only_whats_perturbed_is_computed():
    g = jax.grad(lambda x: 3.0 * fused_xent(x, TABLE, TARGETS, rows=5))(X)
    np.testing.assert_allclose(g, 3.0 * jax.grad(lambda x: plain(x, TABLE, TARGETS))(X), atol=1e-6)
    # a block's products: its logits, then the gradient to each perturbed operand (a frozen table gets none)
    products = lambda grad: str(jax.make_jaxpr(grad)(X, TABLE)).count("dot_general")  # noqa: E731
    assert products(jax.grad(lambda x, t: fused_xent(x, t, TARGETS, rows=5))) == 2
    assert products(jax.grad(lambda x, t: fused_xent(x, t, TARGETS, rows=5), argnums=(0, 1))) == 3
    assert products(jax.grad(lambda x, t: fused_xent(x, t, TARGETS, rows=5), argnums=1)) == 2


def test_per_example_gradients_under_vmap_and_a_checkpointed_loss_are_the_plain_losss():
    fused = lambda x, t: fused_xent(x, TABLE, t, rows=3)  # noqa: E731
    want = jax.vmap(jax.grad(lambda x, t: plain(x[None], TABLE, t[None])))(X, TARGETS)
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda x, t: fused(x[None], t[None])))(X, TARGETS), want, atol=1e-6)
    remat = jax.jit(jax.grad(lambda x: jax.checkpoint(fused)(x, TARGETS)))(X)
    np.testing.assert_allclose(remat, jax.grad(lambda x: plain(x, TABLE, TARGETS))(X), atol=1e-6)


def test_the_backward_keeps_the_gradient_not_the_logits():
    x, table = jnp.ones((4, 256, 64)), jnp.ones((4096, 64))  # logits: 16 MiB; the gradient to x: 256 KiB
    targets = jnp.zeros((4, 256), int)
    losses = dict(fused=lambda x: fused_xent(x, table, targets), plain=lambda x: plain(x, table, targets))
    analyses = {name: jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis() for name, loss in losses.items()}
    temps = {name: analysis.temp_size_in_bytes for name, analysis in analyses.items() if analysis is not None}
    assert temps["fused"] < 0.25 * temps["plain"]
    assert temps["fused"] < 4 * 128 * 4096 * 4  # a block's [512, 2048] logits and exponentials at most


def test_the_models_training_loss_is_the_merged_models_with_adapters():
    config = LlamaConfig(vocab=96, dim=32, layers=2, heads=2, kv_heads=1, hidden=64, remat=False)
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, config.vocab)
    params = Llama(config).init(jax.random.key(0), ids[:, :-1])
    loss = lambda p: Llama(config).apply(p, ids[:, :-1], targets=ids[:, 1:])  # noqa: E731
    logits = Llama(config).apply(params, ids[:, :-1])
    want = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    np.testing.assert_allclose(loss(params), want, rtol=1e-6)
    adapted = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=2, targets=r".*/(q_proj|v_proj)/kernel"),
                         lambda p, x: Llama(config).apply(p, x), params, ids[:, :-1])
    trained, frozen = lorax.split(with_random_b(adapted, jax.random.key(3), scale=0.05))
    got = jax.jit(jax.value_and_grad(lambda t: lorax.lora(loss)(lorax.combine(t, frozen))))(trained)
    merged = jax.jit(jax.value_and_grad(lambda t: loss(lorax.merge(lorax.combine(t, frozen)))))(trained)
    np.testing.assert_allclose(got[0], merged[0], rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(merged[1])):
        np.testing.assert_allclose(g, w, atol=1e-4 * float(jnp.abs(w).max()) + 1e-8)
    untied = dataclasses.replace(config, tie_embeddings=False)  # an lm_head keeps the plain loss
    p = Llama(untied).init(jax.random.key(0), ids[:, :-1])
    np.testing.assert_allclose(Llama(untied).apply(p, ids[:, :-1], targets=ids[:, 1:]),
                               optax.softmax_cross_entropy_with_integer_labels(
                                   Llama(untied).apply(p, ids[:, :-1]), ids[:, 1:]).mean(), rtol=1e-6)


@pytest.mark.parametrize("rows", [0, -1, 2.0, True, "8"])
def test_rows_must_be_a_positive_int(rows):
    with pytest.raises(ValueError, match=f"rows takes a positive int, got {rows!r}"):
        fused_xent(X, TABLE, TARGETS, rows=rows)


@pytest.mark.parametrize("x, table, targets", [
    (X, TABLE[:, :8], TARGETS),  # the table's width is not x's
    (X, TABLE[0], TARGETS),  # not a [vocab, dim] table
    (X, TABLE, TARGETS[:, :3]),  # targets for other tokens
])
def test_shapes_that_do_not_fit_are_refused_with_every_shape_named(x, table, targets):
    with pytest.raises(ValueError, match=rf"x \(3, 7, 16\), table {re.escape(str(table.shape))} and targets "
                                         rf"{re.escape(str(targets.shape))} do not fit"):
        fused_xent(x, table, targets)
