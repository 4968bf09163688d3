"""How LoRA trees look: a plain repr, treescope, and explain's notebook tables."""

import re

import jax
import jax.numpy as jnp
import pytest
import treescope
from helpers import KEY, make_case

import lorax


@pytest.fixture(scope="module")
def adapted():
    fn, params, x = make_case("mlp")
    config = lorax.LoraConfig(rank=2, alpha=6.0, trainable=r".*Dense_0/bias")
    return fn, lorax.init(KEY, config, fn, params, x), x


def test_repr_summarizes_every_field_and_prints_no_numbers():
    w = jnp.full((16, 8), 0.123456, jnp.bfloat16)
    lw = lorax.LoraWeight(w, jnp.full((16, 2), 0.5), jnp.full((2, 8), 0.25), scale=3.0)
    text = repr(lw)
    assert text == ("LoraWeight(lora rank=2 scale=3, w=bf16[16,8] frozen, a=f32[16,2] trainable, "
                    "b=f32[2,8] trainable)")
    assert repr(lorax.Trainable(jnp.full((3,), 0.75))) == "Trainable(full, value=f32[3] trainable)"


def test_repr_of_a_tree_names_paths_and_kinds_without_arrays(adapted):
    _, params, _ = adapted
    text = repr(params)
    assert "'Dense_1': {'bias': Array(" in text  # plain leaves print as JAX prints them
    kernel = repr(params["params"]["Dense_1"]["kernel"])
    assert kernel.startswith("LoraWeight(lora rank=2 scale=3, w=f32[16,32] frozen, a=f32[16,2] trainable")
    assert "Trainable(full, value=f32[16] trainable)" in text
    assert not re.search(r"\d\.\d", kernel)  # no array values, only shapes


def test_repr_of_split_halves_and_stacked_layers():
    fn, params, x = make_case("gpt")
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, targets=r".*query/kernel"), fn, params, x)
    trainable, frozen = lorax.split(lp)
    query = lambda tree: tree["params"]["h"]["query"]["kernel"]  # noqa: E731
    assert "w=None, a=f32[2,32,2] trainable" in repr(query(trainable))
    assert "stack_axes=(0,)" in repr(query(lp))
    assert repr(query(frozen)).startswith("LoraWeight(lora scale=1, w=f32[2,32,4,8] frozen, a=None, b=None")


def test_repr_works_on_abstract_and_traced_values(adapted):
    fn, params, x = adapted
    abstract = jax.eval_shape(lambda p: p, params)
    assert "w=f32[16,32] frozen" in repr(abstract["params"]["Dense_1"]["kernel"])
    seen = []
    jax.jit(lambda p: seen.append(repr(p["params"]["Dense_1"]["kernel"])))(params)
    assert "a=f32[16,2] trainable" in seen[0]


def test_treescope_renders_text_and_html_with_rank_and_roles(adapted):
    _, params, _ = adapted
    text = treescope.render_to_text(params)
    assert "'kernel': LoraWeight(" in text and "# lora rank=2 scale=3" in text
    assert "w=f32[16,32] frozen" in text and "b=f32[2,32] trainable" in text
    assert "value=f32[16] trainable" in text
    html = treescope.render_to_html(params, compressed=False)
    assert "rank=2" in html and "frozen" in html


def test_treescope_renders_an_nnx_state():
    fn, state, x = make_case("nnx")
    text = treescope.render_to_text(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, state, x))
    assert "LoraWeight(" in text and "w=f32[16,2,4] frozen" in text
    assert "a=f32[16,2] trainable" in text  # the einsum kernel: contracted axis i, outputs h, d


def test_explain_renders_markdown_and_html_tables(adapted):
    fn, params, x = adapted
    report = lorax.explain(fn, params, x)
    lines = report._repr_markdown_().splitlines()
    assert lines[0] == "| path | shape | kind | rank | scale | params | computed |"
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == len(report.rows) == 4  # three kernels and one trained bias
    assert "| params/Dense_1/kernel | 16x32 | lora | 2 | 3 | 96 | factored (dot_general) |" in rows
    assert lines[-1].startswith("trainable 244 of ")
    html = report._repr_html_()
    assert html.count("<tr>") == len(report.rows) + 1 and "params/Dense_1/kernel" in html


def test_a_bank_headline_shows_each_adapter_scale_not_the_unused_scale():
    bank = lorax.LoraBank(jnp.ones((4, 3)), jnp.ones((2, 4, 1)), jnp.ones((2, 1, 3)), jnp.array([2.0, 0.5]),
                          jnp.array([1, 1]), names=("x", "y"))
    assert repr(bank).startswith("LoraBank(lora_bank rank=1 scales=2,0.5, w=f32[4,3] frozen")
    seen = []
    jax.jit(lambda b: seen.append(repr(b)) or b.a)(bank)
    assert "scales=f32[2] frozen," in seen[0]
