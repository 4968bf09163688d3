"""`lorax.explain`: the trainable parameter count (the paper's, on models built abstractly) and
paths rendered alike for NNX state."""

import jax
import jax.numpy as jnp
import pytest
from helpers import KEY, make_case
from models import GPT

import lorax


@pytest.mark.parametrize("d, layers, rank, expected", [
    (1024, 24, 4, 393_216),  # GPT-2 medium, Wq and Wv
    (768, 12, 8, 294_912),   # RoBERTa-base, Wq and Wv
])
def test_paper_parameter_counts_built_abstractly(d, layers, rank, expected):
    model = GPT(vocab=50257, d=d, layers=layers, heads=16 if d == 1024 else 12, max_len=8)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = lambda p, ids: model.apply(p, ids)  # noqa: E731
    params = jax.eval_shape(model.init, KEY, ids)
    config = lorax.LoraConfig(rank=rank, targets=r".*/(query|value)/kernel")
    lp = jax.eval_shape(lambda p: lorax.init(KEY, config, fn, p, ids), params)
    assert lorax.explain(fn, lp, ids).trainable == expected


def test_paths_render_alike_for_nnx_state():
    fn, state, x = make_case("nnx")
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, state, x)
    names = [r.path for r in lorax.explain(fn, lp, x).rows]
    assert names == ["down/kernel", "heads/kernel", "up/kernel"]
    heads = lp["heads"]["kernel"].get_value()  # einsum kernel [i, h, d]: a holds i
    assert (heads.a.shape, heads.b.shape) == ((16, 2), (2, 2, 4))
