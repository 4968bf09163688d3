"""`save` / `load` / `save_peft` / `load_peft` arguments and inputs: retention that never deletes a newer
step, state templates that would cast, bases a checkpoint cannot go on; each refusal changes nothing."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unchanged

import lorax
import lorax.peft

MAPPING = [(r"(?P<m>q|v)_proj/kernel", "layer.{m}_proj")]
X = jnp.ones((2, 64))
BASE = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (64, 64)) * 0.1},
        "v_proj": {"kernel": jax.random.normal(jax.random.key(1), (64, 64)) * 0.1}}


def fn(p, x):
    return (x @ p["q_proj"]["kernel"]) @ p["v_proj"]["kernel"]


def adapted(seed=0, **config):
    lp = lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2, **config), fn, BASE, X)
    return jax.tree.map(lambda n: n.replace(b=jnp.full_like(n.b, seed + 1.0)) if isinstance(n, lorax.LoraWeight)
                        else n, lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))


def steps(root: Path) -> list[str]:
    return sorted((p.name for p in root.iterdir() if p.name.isdigit()), key=int)


# -------------------------------------------------------------------------------------------- keep


def test_keep_never_deletes_a_step_newer_than_the_one_written(tmp_path):
    lorax.save(tmp_path, adapted(0), step=5)
    lorax.save(tmp_path, adapted(1), step=3, overwrite=True, keep=1)
    assert steps(tmp_path) == ["3", "5"]
    assert float(lorax.load(tmp_path, BASE, step=5)["q_proj"]["kernel"].b[0, 0]) == 1.0  # step 5 intact


def test_keep_deletes_only_older_steps_beyond_the_newest(tmp_path):
    for step in (1, 2, 5):
        lorax.save(tmp_path, adapted(step), step=step, overwrite=True)
    lorax.save(tmp_path, adapted(3), step=3, overwrite=True, keep=np.int64(2))  # newest two of 1, 2, 3, 5: 3, 5
    assert steps(tmp_path) == ["3", "5"]
    lorax.save(tmp_path, adapted(6), keep=2)  # step 6: the usual run
    assert steps(tmp_path) == ["5", "6"]


# -------------------------------------------------------------------------------------- state templates


def _state(**changes):
    return {"opt": jnp.arange(4.0), "count": jnp.arange(3, dtype=jnp.int32), "lr": 0.5, "step": 7} | changes


@pytest.mark.parametrize("changes, match", [
    (dict(opt=jnp.zeros(4, jnp.bfloat16)), r"state\['opt'\]: saved as float32\[4\], the template holds bfloat16\[4\]"),
    (dict(opt=jnp.zeros(4, jnp.int32)), r"state\['opt'\]: saved as float32\[4\], the template holds int32\[4\]"),
    (dict(count=jnp.zeros(3, jnp.float32)), r"state\['count'\]: saved as int32\[3\], the template holds float32"),
    (dict(opt=jnp.zeros(5)), r"state\['opt'\]: saved as float32\[4\], the template holds float32\[5\]"),
    (dict(lr=0), r"state\['lr'\]: saved as float64\[\], the template holds int"),
    (dict(step=0.0), r"state\['step'\]: saved as int64\[\], the template holds float"),
])
def test_state_template_of_another_dtype_or_shape_is_refused(tmp_path, changes, match):
    lorax.save(tmp_path, adapted(), state=_state())
    unchanged(tmp_path, lambda: lorax.load(tmp_path, BASE, state=_state(**changes)), ValueError,
              r"(?s)the state in .*/0/state' does not match the template given \(restoring would round, truncate "
              r"or reshape it\):\n.*" + match)


def test_state_template_of_the_saved_or_a_wider_dtype_restores_exactly(tmp_path):
    lorax.save(tmp_path, adapted(), state=_state(lr=np.float32(0.25)))
    _, back = lorax.load(tmp_path, BASE, state=_state(opt=jnp.zeros(4), step=0, lr=np.float32(0)))
    np.testing.assert_array_equal(back["opt"], jnp.arange(4.0))
    assert back["step"] == 7 and back["lr"] == np.float32(0.25) and back["count"].dtype == jnp.int32
    _, wide = lorax.load(tmp_path, BASE, state=_state(opt=np.zeros(4), count=np.zeros(3, np.int64)))
    assert wide["opt"].dtype == np.float64 and wide["count"].dtype == np.int64  # widened, every value kept
    np.testing.assert_array_equal(wide["count"], [0, 1, 2])


# -------------------------------------------------------------------------------------------- bases


def test_pissa_checkpoint_onto_a_quantized_base_names_the_weight(tmp_path):
    lorax.save(tmp_path, adapted(init="pissa"))
    quantized = lorax.quantize(BASE, "nf4")
    unchanged(tmp_path, lambda: lorax.load(tmp_path, quantized), ValueError,
              r"q_proj/kernel: the adapter was initialised with init='pissa', so its frozen base is a residual of "
              r"the original weight, which cannot be rebuilt over a quantized \(nf4\) base")
    lorax.load(tmp_path, BASE)


def test_saving_the_trainable_half_alone_is_refused(tmp_path):
    trainable, _ = lorax.split(adapted())
    unchanged(tmp_path, lambda: lorax.save(tmp_path, trainable), TypeError,
              r"LoraWeight at 'q_proj/kernel' holds NoneType as its frozen base w.*lorax.combine")
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "p", trainable, MAPPING), TypeError,
              r"LoraWeight at 'q_proj/kernel' holds NoneType as its frozen base w")


# ---------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", ["yes", 1, None, np.bool_(True)])
def test_check_base_must_be_a_bool(tmp_path, value):
    lorax.save(tmp_path, adapted())
    unchanged(tmp_path, lambda: lorax.load(tmp_path, BASE, check_base=value), TypeError,
              "lorax.load: check_base must be True or False")
    out = lorax.peft.save_peft(tmp_path / "p", adapted(), MAPPING)
    unchanged(tmp_path, lambda: lorax.peft.load_peft(out, fn, BASE, X, mapping=MAPPING, check_base=value),
              TypeError, "lorax.peft.load_peft: check_base must be True or False")


def test_numpy_step_and_keep_are_plain_ints(tmp_path):
    assert lorax.save(tmp_path, adapted(), step=np.int32(2), keep=np.int64(1)).name == "2"
    assert lorax.load(tmp_path, BASE, step=np.int64(2))["q_proj"]["kernel"].rank == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_model_name_or_path=3), r"base_model_name_or_path must be a string, got 3 \(int\)"),
    (dict(base_model_name_or_path=None), "base_model_name_or_path must be a string"),
    (dict(task_type=5), r"task_type must be a string, got 5 \(int\)"),
])
def test_bad_save_peft_arguments_change_nothing(tmp_path, kwargs, match):
    lorax.peft.save_peft(tmp_path / "p", adapted(0), MAPPING)
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "p", adapted(1), MAPPING, **kwargs), TypeError,
              f"lorax.peft.save_peft: {match}")


def test_load_peft_needs_a_function(tmp_path):
    out = lorax.peft.save_peft(tmp_path / "p", adapted(), MAPPING)
    unchanged(tmp_path, lambda: lorax.peft.load_peft(out, "fn", BASE, X, mapping=MAPPING), TypeError,
              r"lorax.peft.load_peft: fn must be the model function .*, got str")
