"""A scanned LLaMA's train-step memory from XLA's compiled programs (deterministic): lorax's LoRA
holds what LoRA written by hand into the model holds, and less than full fine-tuning."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import with_random_b
from jax.ad_checkpoint import print_saved_residuals
from lorax_examples import memory, xent
from lorax_examples.llama import (
    Llama,
    LlamaConfig,
    bf16_as_bits,
    chunked_xent,
    init_cache,
    quantize_like_gguf,
    remat_groups_setting,
)

import lorax

pytestmark = pytest.mark.xdist_group("test_memory")  # the three compiled steps, made once on one worker
CONFIG = LlamaConfig(vocab=256, dim=64, layers=4, heads=4, kv_heads=2, hidden=128, remat=False)


@pytest.fixture(scope="module")
def footprints():
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, CONFIG.vocab)
    params = Llama(CONFIG).init(jax.random.key(0), ids[:, :-1])
    return {v: memory.footprint(*memory.train_step(v, CONFIG, params, ids)) for v in memory.VARIANTS}


def test_lorax_step_holds_what_the_hand_written_lora_step_holds(footprints):
    lorax_step, hand = footprints["lorax"], footprints["hand"]
    assert lorax_step.arguments == hand.arguments
    assert lorax_step.temporaries <= 1.05 * hand.temporaries


def test_lora_step_needs_less_than_full_finetuning_donated_like_for_like(footprints):
    full, lorax_step = footprints["full"], footprints["lorax"]
    assert full.aliased > 0 and lorax_step.aliased > 0  # both steps donate their train state
    assert lorax_step.temporaries <= full.temporaries
    assert lorax_step.total < 0.6 * full.total
    assert full.classes["activation stacks"] > 0  # the layer loop's saved activations are found


def test_hand_written_lora_starts_as_the_plain_model():
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, CONFIG.vocab)
    params = Llama(CONFIG).init(jax.random.key(0), ids)
    hand = dataclasses.replace(CONFIG, lora_targets=("q_proj", "v_proj"))
    factors = memory._hand_factors(params, ("q_proj", "v_proj"), 8)
    out = Llama(hand).apply(memory._with_factors(params, factors), ids)
    assert jnp.allclose(out, Llama(CONFIG).apply(params, ids), atol=1e-6)


def test_breakdown_sorts_buffers_by_the_shape_of_their_largest_value():
    report = "\n".join([
        "Memory Space: default (color=0)",
        "  cumulative_size;       size;       offset; used_by_n_values; shapes_list",
        "   10.00MiB( 50%);   10.00MiB;            0;                5; 5×f32[4,2,8,64]",
        "   14.00MiB( 70%);    4.00MiB;     10485760;                1; f32[4,64,128]",
        "   16.00MiB( 80%);    2.00MiB;     14680064;                2; f32[2,8,64], f32[512,8]",
        "", "  second section", "    9.00MiB; 4; 1; f32[4,64,128]"])
    classes = memory.breakdown(report, {(4, 64, 128)})
    assert classes == {"activation stacks": 10 * 2**20, "weight-shaped stacks": 4 * 2**20}
    grouped = report.replace("5×f32[4,2,8,64]", "5×f32[2,2,8,64]")  # the stack of a loop over 2 groups
    assert memory.breakdown(grouped, {(4, 64, 128)})["activation stacks"] == 0
    assert memory.breakdown(grouped, {(4, 64, 128)}, loops=(2,))["activation stacks"] == 10 * 2**20


def test_footprint_classes_add_up_to_the_temporaries(footprints):
    for f in footprints.values():
        assert sum(f.classes.values()) == f.temporaries and min(f.classes.values()) >= 0


def test_recomputing_each_layer_drops_the_saved_activations_and_lorax_still_holds_the_hand_written_step(footprints):
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, CONFIG.vocab)
    params = Llama(CONFIG).init(jax.random.key(0), ids[:, :-1])
    remat = dataclasses.replace(CONFIG, remat=True)
    saved = {v: memory.footprint(*memory.train_step(v, remat, params, ids)) for v in ("hand", "lorax")}
    assert saved["lorax"].temporaries <= 1.05 * saved["hand"].temporaries
    assert saved["lorax"].classes["activation stacks"] < 0.25 * footprints["lorax"].classes["activation stacks"]


@pytest.fixture(scope="module")
def saved_by_the_layer_loop() -> str:
    """What the backward of lorax's q,v LoRA step over `CONFIG` keeps, as `print_saved_residuals` lists it."""
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, CONFIG.vocab)
    plain = lambda p, x, t: Llama(CONFIG).apply(p, x, targets=t)  # noqa: E731
    params = Llama(CONFIG).init(jax.random.key(0), ids[:, :-1])
    adapted = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=4, targets=r".*/(q|v)_proj/kernel"), plain,
                         params, ids[:, :-1], ids[:, 1:])
    trained, frozen = lorax.split(adapted)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda t: lorax.lora(plain)(lorax.combine(t, frozen), ids[:, :-1], ids[:, 1:]), trained)
    return printed.getvalue()


def test_the_layer_loop_saves_the_mlp_gating_s_two_inputs_alone(saved_by_the_layer_loop):
    """Of the MLP's hidden-width activations the backward keeps gate and up (the gating is
    recomputed from them), not also sigmoid(gate), silu(gate) and their product."""
    hidden = f"f32[{CONFIG.layers},2,32,{CONFIG.hidden}] output of scan"
    assert saved_by_the_layer_loop.count(hidden) == 2


def test_the_layer_loop_saves_attention_s_queries_keys_and_values_alone(saved_by_the_layer_loop):
    """Attention is recomputed in the backward from q, k and v: the layer loop keeps no
    [batch, heads, seq, seq] scores or probabilities and no keys or values repeated per query head."""
    c, saved = CONFIG, saved_by_the_layer_loop
    per_query_head = f"f32[{c.layers},2,32,{c.heads},{c.head_dim}] output of scan"
    per_kv_head = f"f32[{c.layers},2,32,{c.kv_heads},{c.head_dim}] output of scan"
    assert saved.count(per_query_head) == 1 and saved.count(per_kv_head) == 2  # q after RoPE; k after RoPE, v
    assert not re.search(rf"f32\[{c.layers},2,{c.heads},32,(32|1)\] output of scan", saved)


def test_a_bf16_base_costs_its_bits_and_nothing_more(footprints):
    """XLA:CPU slices a bf16 stack in the layer loop from an fp32 copy of the whole stack (the
    hand-written step holds one); lorax's step takes the stacks as bits (`lorax.Bf16Bits`) and
    the table, which the loss reads whole, as bf16: it holds a copy of neither, its only
    weight-shaped temporaries are the adapters' own (their gradients), and its temporaries are
    no more than the fp32 step's."""
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, CONFIG.vocab)
    params = Llama(CONFIG).init(jax.random.key(0), ids[:, :-1])
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    config = dataclasses.replace(CONFIG, matmul_dtype=jnp.bfloat16)
    steps = {v: memory.train_step(v, config, bf16, ids) for v in ("hand", "lorax")}
    got = {v: memory.footprint(*step) for v, step in steps.items()}
    stacks_bf16 = sum(x.size * 2 for x in jax.tree.leaves(bf16) if x.ndim == 3)
    lorax_fp32 = footprints["lorax"]
    weight_shaped = lambda f: f.classes["weight-shaped stacks"]  # noqa: E731
    assert weight_shaped(got["hand"]) >= 2 * stacks_bf16  # the fp32 copy this test keeps out of lorax's step
    adapters = steps["lorax"][1][0]  # the step's arguments: adapters, optimizer state, frozen, ids
    assert weight_shaped(got["lorax"]) <= sum(x.nbytes for x in jax.tree.leaves(adapters))
    assert got["lorax"].total < lorax_fp32.total and got["lorax"].total < got["hand"].total
    assert got["lorax"].temporaries <= lorax_fp32.temporaries
    assert not computed_copies(*steps["lorax"], params)


def test_a_bf16_base_keeps_the_mlp_gating_s_two_inputs_as_bf16_bits():
    """With bf16 products the layer loop keeps gate and up rounded to bf16, as bits: half the
    bytes of fp32, and no stack of them in fp32 or bf16 anywhere in the compiled step (XLA:CPU
    writes a bf16 stack in a loop through an fp32 copy of the whole stack, bits as they are)."""
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, CONFIG.vocab)
    params = Llama(CONFIG).init(jax.random.key(0), ids[:, :-1])
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    step, args = memory.train_step("lorax", dataclasses.replace(CONFIG, matmul_dtype=jnp.bfloat16), bf16, ids)
    program = step.lower(*args).compile().as_text()
    stack = re.escape(f"[{CONFIG.layers},2,32,{CONFIG.hidden}]")
    assert re.search(rf"\bu16{stack}", program)
    assert not re.search(rf"\b(f32|bf16){stack}", program)


HEAD = LlamaConfig(vocab=4096, dim=128, layers=4, heads=4, kv_heads=2, hidden=512, remat=True, head_chunks=8)


def test_a_4bit_base_with_remat_and_the_loss_over_vocabulary_slices_needs_under_0_4_of_fp32():
    """QLoRA's promise on a scanned LLaMA whose weights dominate, as SmolLM2-135M's do once each
    layer is recomputed: the Q4_1 step (Q8_0 tied embedding) holds at most 0.40 of the fp32
    step, and never a full-precision copy of a layer stack or of the table."""
    ids = jax.random.randint(jax.random.key(1), (1, 17), 0, HEAD.vocab)
    params = Llama(HEAD).init(jax.random.key(0), ids[:, :-1])
    q4 = quantize_like_gguf(params)
    fp32 = memory.footprint(*memory.train_step("lorax", HEAD, params, ids))
    step, args = memory.train_step("lorax", HEAD, q4, ids)
    quantized = memory.footprint(step, args)
    assert quantized.total <= 0.40 * fp32.total
    assert quantized.classes["weight-shaped stacks"] <= 0.01 * fp32.total  # no dequantized stack
    text = step.lower(*args).compile().as_text()
    stacks = {x.shape for x in jax.tree.leaves(params) if x.ndim == 3} | {(HEAD.vocab, HEAD.dim)}
    assert not [s for s in stacks if f"f32[{','.join(map(str, s))}]" in text]


def test_a_bf16_base_with_remat_and_the_loss_over_vocabulary_slices_needs_under_0_55_of_fp32():
    """A bf16 base costs its bits: held as `lorax.Bf16Bits`, the step holds no copy of a stack
    or of the table, in any dtype, and needs at most 0.55 of the fp32 step."""
    ids = jax.random.randint(jax.random.key(1), (1, 17), 0, HEAD.vocab)
    params = Llama(HEAD).init(jax.random.key(0), ids[:, :-1])
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    fp32 = memory.footprint(*memory.train_step("lorax", HEAD, params, ids))
    step, args = memory.train_step("lorax", dataclasses.replace(HEAD, matmul_dtype=jnp.bfloat16), bf16, ids)
    assert memory.footprint(step, args).total <= 0.55 * fp32.total
    assert isinstance(args[2]["params"]["embed_tokens"]["embedding"], lorax.Bf16Bits)
    assert not computed_copies(step, args, params)


def computed_copies(step, args, params) -> list[str]:
    """The instructions of ``step``'s compiled program that write an array shaped like a layer
    stack or the table of ``params``, in any dtype: a copy of a weight, since its arguments are
    none. Instructions inside a fusion write nothing of their own and are left out."""
    text = step.lower(*args).compile().as_text()
    fused = set(re.findall(r"\bfusion\(.*?calls=(%[\w.-]+)", text))
    shapes = {x.shape for x in jax.tree.leaves(params) if x.ndim == 3}
    shapes |= {params["params"]["embed_tokens"]["embedding"].shape}
    written = re.compile(rf"= \w+\[({'|'.join(','.join(map(str, s)) for s in shapes)})\]\S* "
                         r"(?!parameter|get-tuple-element|bitcast\()")
    return [line for computation in text.split("\n\n") if computation.split(" ", 1)[0] not in fused
            for line in computation.splitlines() if written.search(line)]


def test_the_loss_over_vocabulary_slices_is_the_merged_models_loss_and_gradients():
    ids = jax.random.randint(jax.random.key(1), (2, 17), 0, HEAD.vocab)
    whole = dataclasses.replace(HEAD, head_chunks=0)
    params = Llama(whole).init(jax.random.key(0), ids[:, :-1])
    loss = lambda p, config: Llama(config).apply(p, ids[:, :-1], targets=ids[:, 1:])  # noqa: E731
    config = lorax.LoraConfig(rank=4, targets=r".*/(q_proj|v_proj)/kernel")
    adapted = lorax.init(jax.random.key(2), config, lambda p, x: Llama(whole).apply(p, x), params, ids[:, :-1])
    adapted = with_random_b(adapted, jax.random.key(3), scale=0.02)
    trained, frozen = lorax.split(adapted)
    chunked = lambda t: lorax.lora(loss)(lorax.combine(t, frozen), HEAD)  # noqa: E731
    merged = lambda t: loss(lorax.merge(lorax.combine(t, frozen)), whole)  # noqa: E731
    got, want = jax.value_and_grad(chunked)(trained), jax.value_and_grad(merged)(trained)
    assert abs(float(got[0]) - float(want[0])) < 1e-4 * float(want[0])
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert float(jnp.abs(g - w).max()) <= 1e-3 * float(jnp.abs(w).max()) + 1e-7
    assert max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want[1])) > 1e-4


@pytest.mark.parametrize("chunks", [3, 0, 0.5, -8, True])
def test_vocabulary_slices_must_divide_the_vocabulary(chunks):
    x, table = jnp.ones((1, 2, 8)), jnp.ones((16, 8))
    with pytest.raises(ValueError, match=r"head-chunks takes 0 or a divisor of the vocabulary \(16\)"):
        chunked_xent(x, table, jnp.zeros((1, 2), int), chunks)


def test_the_training_loss_refuses_a_cache_and_an_untied_head():
    ids = jnp.zeros((1, 4), int)
    untied = dataclasses.replace(CONFIG, tie_embeddings=False, head_chunks=4)
    params = Llama(untied).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="head_chunks slices the tied embedding"):
        Llama(untied).apply(params, ids, targets=ids)
    with pytest.raises(ValueError, match="targets .* take no cache"):
        Llama(CONFIG).apply(params, ids, positions=ids, cache=init_cache(CONFIG, 1, 4), targets=ids)


GROUPED = LlamaConfig(vocab=256, dim=64, layers=16, heads=4, kv_heads=2, hidden=128, remat=True, head_chunks=4,
                      remat_groups=4)


def _lora_step_of(config: LlamaConfig, ids):
    """``(loss of the trained leaves, trained, frozen)``: lorax's q,v LoRA over ``config``, b ≠ 0."""
    loss = lambda p, x, t: Llama(config).apply(p, x, targets=t)  # noqa: E731
    params = Llama(dataclasses.replace(config, remat_groups=0)).init(jax.random.key(0), ids[:, :-1])
    adapted = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=4, targets=r".*/(q|v)_proj/kernel"), loss,
                         params, ids[:, :-1], ids[:, 1:])
    adapted = with_random_b(adapted, jax.random.key(3), scale=0.02)
    trained, frozen = lorax.split(adapted)
    return lambda t: lorax.lora(loss)(lorax.combine(t, frozen), ids[:, :-1], ids[:, 1:]), trained, frozen


@pytest.mark.parametrize("remat", [True, False, "dots_with_no_batch_dims_saveable"])
def test_layers_in_recomputed_groups_give_the_merged_models_loss_and_gradients(remat):
    """`LlamaConfig.remat_groups` inside `lorax.lora`, under each remat setting: every adapter
    stays factored (each layer indexes its own weights out of the stacks), and the loss and
    adapter gradients are the merged model's, run as one loop."""
    ids = jax.random.randint(jax.random.key(1), (2, 17), 0, GROUPED.vocab)
    grouped, trained, frozen = _lora_step_of(dataclasses.replace(GROUPED, remat=remat), ids)
    one_loop = dataclasses.replace(GROUPED, remat_groups=0)
    merged = lambda t: Llama(one_loop).apply(lorax.merge(lorax.combine(t, frozen)), ids[:, :-1],  # noqa: E731
                                             targets=ids[:, 1:])
    got, want = jax.value_and_grad(grouped)(trained), jax.value_and_grad(merged)(trained)
    assert abs(float(got[0]) - float(want[0])) < 1e-5 * float(want[0])
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert float(jnp.abs(g - w).max()) <= 1e-3 * float(jnp.abs(w).max()) + 1e-7
    assert max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want[1])) > 1e-4
    plain = lambda p: Llama(GROUPED).apply(p, ids[:, :-1], targets=ids[:, 1:])  # noqa: E731
    assert not lorax.explain(plain, lorax.combine(trained, frozen)).materialized


def test_layers_in_recomputed_groups_keep_one_residual_stream_per_group_and_per_layer_of_a_group():
    """With 16 layers in 4 groups the backward keeps the residual stream at the 4 groups' inputs
    (and, recomputing a group, at its 4 layers'), where the one loop keeps all 16: the step's
    temporaries drop by most of the 8 streams between."""
    ids = jax.random.randint(jax.random.key(1), (8, 65), 0, GROUPED.vocab)
    stream = 8 * 64 * GROUPED.dim * 4
    saved = {}
    for groups in (0, 4):
        step, trained, _ = _lora_step_of(dataclasses.replace(GROUPED, remat_groups=groups), ids)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(step, trained)
        saved[groups] = printed.getvalue()
    assert "f32[16,8,64,64] output of scan" in saved[0] and "f32[16,8,64,64]" not in saved[4]
    assert "f32[4,8,64,64] output of scan" in saved[4]
    params = Llama(dataclasses.replace(GROUPED, remat_groups=0)).init(jax.random.key(0), ids[:, :-1])
    one_loop, grouped = (memory.footprint(*memory.train_step("lorax", dataclasses.replace(GROUPED, remat_groups=g),
                                                             params, ids)) for g in (0, 4))
    assert grouped.temporaries <= one_loop.temporaries - 6 * stream


@pytest.mark.parametrize("groups", [1, 16, 3, -2, 2.0, True, "4"])
def test_remat_groups_must_divide_the_layers_into_groups_of_two_or_more(groups):
    assert remat_groups_setting(np.int64(8), 16) == 8 and remat_groups_setting(0, 16) == 0
    with pytest.raises(ValueError, match=r"remat-groups takes 0 or a divisor of the layer count \(16\) from 2 to 8"):
        remat_groups_setting(groups, 16)
    ids = jnp.zeros((1, 4), int)
    params = Llama(dataclasses.replace(GROUPED, remat_groups=0)).init(jax.random.key(0), ids)
    if isinstance(groups, int) and not isinstance(groups, bool):
        with pytest.raises(ValueError, match="remat-groups takes"):
            Llama(dataclasses.replace(GROUPED, remat_groups=groups)).apply(params, ids)


def test_bf16_as_bits_holds_what_the_step_slices_in_a_loop(monkeypatch):
    """The layer loop's bf16 stacks (norm scales too) as bits; the tied table as bits only when
    the loss slices it (over vocabulary slices, or in chunks when it has more rows than one
    chunk), also when an adapter holds it (lorax names the adapter's w by its path)."""
    ids = jnp.zeros((1, 4), int)
    params = Llama(CONFIG).init(jax.random.key(0), ids)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    held = bf16_as_bits(bf16)["params"]
    assert isinstance(held["layers"]["mlp"]["up_proj"]["kernel"], lorax.Bf16Bits)
    assert isinstance(held["layers"]["input_layernorm"]["scale"], lorax.Bf16Bits)  # [layers, dim], sliced too
    assert held["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    table_only = dict(params["params"], embed_tokens={"embedding": bf16["params"]["embed_tokens"]["embedding"]})
    adapted = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2, targets=r".*/embedding"),
                         lambda p, x: Llama(CONFIG).apply(p, x), {"params": table_only}, ids)
    frozen = lorax.split(adapted)[1]
    assert bf16_as_bits(frozen) is frozen  # nothing the step slices in a loop is bf16
    table = bf16_as_bits(frozen, head_chunks=4)["params"]["embed_tokens"]["embedding"]
    assert isinstance(table, lorax.LoraWeight) and isinstance(table.w, lorax.Bf16Bits)
    monkeypatch.setattr(xent, "VOCAB_CHUNK", CONFIG.vocab // 2)  # the loss reads the table in two chunks
    assert isinstance(bf16_as_bits(bf16)["params"]["embed_tokens"]["embedding"], lorax.Bf16Bits)
