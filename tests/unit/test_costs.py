"""LoRA's promise, checked on the compiled program (XLA cost and memory analysis)."""

import math

import pytest
from lorax_examples import gpt as costs

# GPT-2-small widths (d=768, 12 heads), 4 layers, batch 4, seq 128, r=8 on every linear layer.
WIDTHS = dict(d=768, heads=12, layers=4, vocab=2048, batch=4, seq=128, rank=8)


@pytest.fixture(scope="module")
def step_costs():
    return costs.train_step_costs(**WIDTHS)


def test_lora_step_costs_at_most_070_of_full_finetuning_flops(step_costs):
    assert step_costs["lora"].flops <= 0.70 * step_costs["full"].flops


def test_materialized_reference_costs_about_full_finetuning(step_costs):
    # the same measure can fail: building W + s·A·B each step pays a W-sized gradient
    assert step_costs["materialized"].flops >= 0.9 * step_costs["full"].flops


def test_lora_step_outputs_hold_no_frozen_weight(step_costs):
    lora, full = step_costs["lora"], step_costs["full"]
    frozen_shapes = {s for s in full.output_shapes if len(s) >= 2}
    assert not frozen_shapes & set(lora.output_shapes)
    # adapters, two Adam moments and the loss: under 2% of full fine-tuning's outputs
    assert lora.output_bytes <= 0.02 * full.output_bytes


def test_lora_step_memory_is_a_fraction_of_full_finetuning_when_weight_bound():
    c = costs.train_step_costs(**{**WIDTHS, "batch": 1, "seq": 32}, variants=("full", "lora"))
    assert c["lora"].step_bytes <= 0.40 * c["full"].step_bytes


def test_merged_inference_costs_exactly_the_base():
    c = costs.inference_costs(d=256, heads=4, layers=2, vocab=512, batch=2, seq=32, rank=8)
    assert c["merged"].flops == c["base"].flops
    assert c["unmerged"].flops <= 1.1 * c["base"].flops
    assert math.isfinite(c["unmerged"].flops)
