"""A scanned LLaMA's train-step memory from XLA's compiled programs (deterministic): lorax's LoRA
holds what LoRA written by hand into the model holds, and less than full fine-tuning."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from lorax_examples import memory
from lorax_examples.llama import Llama, LlamaConfig

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


def test_a_bf16_base_costs_at_most_its_bits_in_temporaries_and_less_than_fp32(footprints):
    """XLA:CPU slices a bf16 stack in the layer loop from an fp32 copy of the whole stack (the
    hand-written step holds one); lorax scans its bits, so its weight-shaped temporaries stay
    within one bf16 copy of the stacks, and the bf16 step needs less than the fp32 one."""
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, CONFIG.vocab)
    params = Llama(CONFIG).init(jax.random.key(0), ids[:, :-1])
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    config = dataclasses.replace(CONFIG, matmul_dtype=jnp.bfloat16)
    got = {v: memory.footprint(*memory.train_step(v, config, bf16, ids)) for v in ("hand", "lorax")}
    stacks_bf16 = sum(x.size * 2 for x in jax.tree.leaves(bf16) if x.ndim == 3)
    lorax_fp32 = footprints["lorax"]
    weight_shaped = lambda f: f.classes["weight-shaped stacks"]  # noqa: E731
    assert weight_shaped(got["hand"]) >= 2 * stacks_bf16  # the fp32 copy this test keeps out of lorax's step
    assert weight_shaped(got["lorax"]) <= weight_shaped(lorax_fp32) + stacks_bf16
    assert got["lorax"].total < lorax_fp32.total and got["lorax"].total < got["hand"].total
