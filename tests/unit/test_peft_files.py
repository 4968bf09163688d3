"""PEFT folders without torch: what `load_peft` refuses in a damaged or foreign folder, how
target_modules are honoured, module names, and `save_peft` writes that complete or change nothing."""

import json
import warnings

import numpy as np
import pytest
from helpers import QV_BASE as BASE
from helpers import QV_MAPPING as MAPPING
from helpers import QV_X as X
from helpers import qv_adapted as adapted
from helpers import qv_b as b_of
from helpers import qv_fn as fn
from helpers import snapshot, unchanged
from safetensors.numpy import load_file, save_file

import lorax
import lorax.peft
from lorax._src.io import peft_folder as peft_impl


@pytest.fixture
def folder(tmp_path):
    return lorax.peft.save_peft(tmp_path / "adapter", adapted(0), MAPPING)


def load(folder):
    return lorax.peft.load_peft(folder, fn, BASE, X, mapping=MAPPING)


def _edit_config(folder, change):
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps(change(config)))


@pytest.mark.parametrize("change, error, match", [
    (lambda c: [c], ValueError, "expected a JSON object, got list"),
    (lambda c: "LORA", ValueError, "expected a JSON object, got str"),
    (lambda c: {**c, "alpha_pattern": {"(": 2}}, ValueError, r"alpha_pattern: '\(' is not a valid regex"),
    (lambda c: {**c, "lora_alpha": 0}, ValueError, "lora_alpha must be > 0, got 0.0"),
    (lambda c: {**c, "lora_alpha": -2}, ValueError, "lora_alpha must be > 0"),
    (lambda c: {**c, "lora_alpha": float("nan")}, ValueError, "lora_alpha must be a finite number, got nan"),
    (lambda c: {**c, "lora_alpha": "8"}, TypeError, "lora_alpha must be a number"),
    (lambda c: {**c, "alpha_pattern": {"q_proj": 0}}, ValueError, r"alpha_pattern\['q_proj'\] must be > 0"),
    (lambda c: {**c, "r": 0}, ValueError, "r must be a positive int, got 0"),
    (lambda c: {**c, "r": 3}, ValueError, r"'layer.q_proj': lora_A \(2, 6\) / lora_B \(5, 2\) do not hold rank 3"),
    (lambda c: {**c, "r": True}, TypeError, "r must be a positive int"),
    (lambda c: {**c, "target_modules": 5}, ValueError, "target_modules must be a list of module names or a regex"),
    (lambda c: {**c, "target_modules": "("}, ValueError, r"target_modules: '\(' is not a valid regex"),
    (lambda c: {**c, "use_rslora": "no"}, TypeError, "use_rslora must be true or false"),
])
def test_bad_peft_config_is_refused(folder, change, error, match):
    _edit_config(folder, change)
    unchanged(folder, lambda: load(folder), error, match)


def test_peft_rank_pattern_explains_other_ranks(folder):
    _edit_config(folder, lambda c: {**c, "r": 3, "rank_pattern": {"q_proj": 2, "v_proj": 2}})
    assert load(folder)["q_proj"]["kernel"].rank == 2


def test_peft_module_missing_lora_b_is_named(folder):
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.layer.v_proj.lora_B.weight"]
    save_file(tensors, weights)
    unchanged(folder, lambda: load(folder), ValueError, "module 'layer.v_proj' has no lora_B tensor")


@pytest.mark.parametrize("targets", [["q_proj"], r"layer\.q_proj"])
def test_peft_target_modules_are_honoured_as_peft_does(folder, targets):
    _edit_config(folder, lambda c: {**c, "target_modules": targets})
    with pytest.warns(UserWarning, match=r"does not cover \['layer.v_proj'\]; their tensors are skipped"):
        lp = load(folder)
    assert isinstance(lp["q_proj"]["kernel"], lorax.LoraWeight)
    assert not isinstance(lp["v_proj"]["kernel"], lorax.LoraWeight)


def test_save_peft_refuses_a_mapping_collision_and_writes_nothing(tmp_path):
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "a", adapted(0), [(r".*/kernel", "layer.same")]),
              ValueError, r"the mapping gives 'q_proj/kernel' and 'v_proj/kernel' one torch name 'layer.same'")
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "a", adapted(0), "not a mapping"), TypeError,
              "mapping must be a function")


def test_save_peft_crash_leaves_the_old_adapter_complete(folder, monkeypatch):
    (folder / "README.md").write_text("model card")
    old = snapshot(folder.parent)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_impl, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lorax.peft.save_peft(folder, adapted(5), MAPPING)
    assert snapshot(folder.parent) == old  # no half-written sibling either
    monkeypatch.undo()
    lorax.peft.save_peft(folder, adapted(5), MAPPING)
    np.testing.assert_array_equal(b_of(load(folder)), b_of(adapted(5)))
    assert (folder / "README.md").read_text() == "model card"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]


def test_peft_paths_that_are_files_or_missing_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "file", adapted(0), MAPPING), ValueError,
              "is a file, not a folder")
    unchanged(tmp_path, lambda: load(tmp_path / "missing"), ValueError, "does not exist")


def test_no_warnings_on_the_happy_path(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(folder)


def test_save_peft_carries_other_files_and_folders_over(folder):
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a b c")
    lorax.peft.save_peft(folder, adapted(3), MAPPING)
    assert (folder / "tokenizer" / "vocab.txt").read_text() == "a b c"
    np.testing.assert_array_equal(b_of(load(folder)), b_of(adapted(3)))


def test_save_peft_refuses_a_scale_peft_cannot_express(tmp_path):
    lp = adapted(0)
    k = lp["q_proj"]["kernel"]
    lp["q_proj"]["kernel"] = lorax.LoraWeight(k.w, k.a, k.b, scale=-1.0)
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "a", lp, MAPPING), ValueError,
              r"lora_alpha \(scale x rank\) of 'q_proj/kernel' must be > 0, got -2.0")


@pytest.mark.parametrize("mapping, path, index, expected", [
    (lorax.peft.LLAMA, "params/layers/self_attn/q_proj/kernel", (3,), "model.layers.3.self_attn.q_proj"),
    (lorax.peft.LLAMA, "params/layers_7/mlp/down_proj/kernel", (), "model.layers.7.mlp.down_proj"),
    (lorax.peft.LLAMA, "params/layers/self_attn/q_proj/kernel", (), None),  # a stack needs its layer
    (lorax.peft.GPT2, "params/h/attn/c_attn/kernel", (0,), "transformer.h.0.attn.c_attn"),
    (lorax.peft.GPT2, "params/h_11/mlp/c_fc/kernel", (), "transformer.h.11.mlp.c_fc"),
    (lorax.peft.GPT2, "params/wte/embedding", (), "transformer.wte"),
    (lambda path, index: f"custom.{path}.{index}", "x", (1,), "custom.x.(1,)"),
])
def test_module_names(mapping, path, index, expected):
    assert lorax.peft.module_name(mapping, path, index) == expected
