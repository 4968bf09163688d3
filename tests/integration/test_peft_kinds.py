"""IA³, LoHa, LoKr, OFT and VeRA travel to and from PEFT (peft_type IA3, LOHA, LOKR, OFT, VERA): lorax ->
folder -> PeftModel logits, a PEFT-made adapter -> lorax logits, and PEFT's merge against lorax.merge,
on a small LLaMA whose layers are one nn.scan stack and on the real SmolLM2 GGUF."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
from helpers import require_smollm, unchanged

import lorax
import lorax.peft

if os.environ.get("CI") == "true":  # CI installs the torch stack: a missing one is a failure
    import peft
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

from test_peft import IDS, jax_twin, rel_err, torch_llama, torch_logits, train_in_torch  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
LORAX_TARGETS = r".*/(q_proj|v_proj|down_proj)/kernel"
KINDS = {  # name: (lorax config, PEFT config)
    "ia3": (dict(kind="ia3", options={"feedforward": r".*/down_proj/kernel"}),
            lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])),
    "loha": (dict(kind="loha", rank=4, alpha=8.0, rank_pattern={r".*/v_proj/kernel": 2}),
             lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2})),
    "lokr": (dict(kind="lokr", rank=4, alpha=2.0),
             lambda: peft.LoKrConfig(r=4, alpha=2, target_modules=TARGETS)),
    "lokr-both": (dict(kind="lokr", rank=2, alpha=4.0, options={"decompose_both": True, "decompose_factor": 4}),
                  lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=TARGETS, decompose_both=True,
                                          decompose_factor=4)),
    "oft": (dict(kind="oft", options={"block_size": 8}),
            lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS)),
    "oft-exact": (dict(kind="oft", options={"block_size": 16, "neumann_terms": 0}),
                  lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS, use_cayley_neumann=False)),
    "vera": (dict(kind="vera", rank=8), lambda: peft.VeraConfig(r=8, target_modules=TARGETS)),
}


def moved(lp, seed=1, scale=0.3):
    """Every trained array moved off its start (IA³'s ones, LoHa's and LoKr's zero factors)."""
    trainable, frozen = lorax.split(lp)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return lorax.combine(jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                                      for k, x in zip(keys, leaves)]), frozen)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lorax_adapter_loads_in_peft_with_equal_logits(kind, tmp_path):
    model = torch_llama()
    fn, params = jax_twin(model)
    config = lorax.LoraConfig(targets=LORAX_TARGETS, **KINDS[kind][0])
    lp = lorax.init(jax.random.key(1), config, fn, params, IDS)
    base = fn(params, IDS)
    assert rel_err(lorax.lora(fn)(lp, IDS), base) < 1e-6  # unchanged at init, as PEFT's
    lp = moved(lp)
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["peft_type"] == KINDS[kind][1]().peft_type.value
    assert written["target_modules"] == sorted(TARGETS)
    peft_model = peft.PeftModel.from_pretrained(model, str(folder)).eval()
    ours, theirs = lorax.lora(fn)(lp, IDS), torch_logits(peft_model)
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(base, theirs) > 1e-2  # the adapter really changes the logits
    merged = peft_model.merge_and_unload()
    assert rel_err(fn(lorax.merge(lp), IDS), torch_logits(merged)) < 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_trained_adapter_imports_with_equal_logits(kind, tmp_path):
    model = peft.get_peft_model(torch_llama(), KINDS[kind][1]())
    with torch.no_grad():  # LoHa's and LoKr's zero factors give no gradient to the others: start off zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    train_in_torch(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    theirs = torch_logits(model)
    with model.disable_adapter():
        base_logits = torch_logits(model)
    fn, params = jax_twin(torch_llama())
    np.testing.assert_allclose(fn(params, IDS), base_logits, rtol=1e-4, atol=1e-5)
    lp = lorax.peft.load_peft(tmp_path / "adapter", fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert rel_err(lorax.lora(fn)(lp, IDS), theirs) < 1e-4
    assert rel_err(base_logits, theirs) > 1e-3
    stack = lp["params"]["layers"]
    assert type(stack["mlp"]["down_proj"]["kernel"]).kind == KINDS[kind][0]["kind"]
    if kind == "ia3":
        assert stack["mlp"]["down_proj"]["kernel"].on_input and not stack["self_attn"]["q_proj"]["kernel"].on_input
    if kind == "loha":
        assert stack["self_attn"]["v_proj"]["kernel"].rank == 2 and stack["self_attn"]["q_proj"]["kernel"].rank == 4
    if kind == "oft-exact":
        assert stack["self_attn"]["q_proj"]["kernel"].neumann_terms == 0
    if kind == "vera":  # PEFT's torch-drawn projections, one array for every node
        q, down = stack["self_attn"]["q_proj"]["kernel"], stack["mlp"]["down_proj"]["kernel"]
        assert q.vera_a is down.vera_a
        np.testing.assert_array_equal(q.vera_a, model.base_model.vera_A["default"].numpy())
    # back out again, bit for bit
    folder = lorax.peft.save_peft(tmp_path / "again", lp, lorax.peft.LLAMA)
    again = lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)
    for x, y in zip(jax.tree.leaves(lorax.split(again)[0]), jax.tree.leaves(lorax.split(lp)[0])):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c.update(peft_type="BOFT"),
     r"peft_type is 'BOFT'; lorax reads \['IA3', 'LOHA', 'LOKR', 'LORA', 'OFT', 'VERA'\]"),
    (lambda c: c.update(lokr_magic=1), r"unknown keys \['lokr_magic'\] for peft_type 'LOKR'"),
    (lambda c: c.update(r=0), "r must be"),
    (lambda c: c.update(layers_to_transform=[0]), r"layers_to_transform=\[0\] is not supported"),
    (lambda c: c.update(decompose_factor=3), r"holds lokr_w1 .* takes lokr_w1 "),
])
def test_a_damaged_kind_folder_is_refused_and_names_the_problem(change, match, tmp_path):
    model = torch_llama()
    fn, params = jax_twin(model)
    lp = moved(lorax.init(jax.random.key(1), lorax.LoraConfig(targets=LORAX_TARGETS, **KINDS["lokr"][0]),
                          fn, params, IDS))
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)


def test_a_folder_for_another_base_is_refused(tmp_path):
    fn, params = jax_twin(torch_llama())
    lp = moved(lorax.init(jax.random.key(1), lorax.LoraConfig(targets=LORAX_TARGETS, **KINDS["loha"][0]),
                          fn, params, IDS))
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    _, other = jax_twin(torch_llama(seed=1))
    with pytest.raises(ValueError, match=r"the base is not the one .* was saved from"):
        lorax.peft.load_peft(folder, fn, other, IDS, mapping=lorax.peft.LLAMA)


def test_mixed_kinds_are_refused_in_one_folder(tmp_path):
    fn, params = jax_twin(torch_llama())
    q = lorax.init(jax.random.key(1), lorax.LoraConfig(kind="ia3", targets=r".*/q_proj/kernel"), fn, params, IDS)
    v = lorax.init(jax.random.key(1), lorax.LoraConfig(kind="loha", targets=r".*/v_proj/kernel"), fn, params, IDS)
    attn = q["params"]["layers"]["self_attn"] | {"v_proj": v["params"]["layers"]["self_attn"]["v_proj"]}
    mixed = {"params": q["params"] | {"layers": q["params"]["layers"] | {"self_attn": attn}}}
    with pytest.raises(ValueError, match=r"cannot export adapters of kinds \['Ia3Weight', 'LohaWeight'\]"):
        lorax.peft.save_peft(tmp_path / "mixed", mixed, lorax.peft.LLAMA)
    assert not (tmp_path / "mixed").exists()


def test_a_truncated_kind_folder_and_a_refused_overwrite_leave_the_files_as_they_were(tmp_path):
    fn, params = jax_twin(torch_llama())
    lp = moved(lorax.init(jax.random.key(1), lorax.LoraConfig(targets=LORAX_TARGETS, **KINDS["oft"][0]),
                          fn, params, IDS))
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    ia3 = lorax.init(jax.random.key(1), lorax.LoraConfig(targets=LORAX_TARGETS, kind="ia3"), fn, params, IDS)
    mixed = {"params": lp["params"] | {"layers": lp["params"]["layers"] | {
        "mlp": ia3["params"]["layers"]["mlp"]}}}
    unchanged(tmp_path, lambda: lorax.peft.save_peft(folder, mixed, lorax.peft.LLAMA), ValueError,
              r"cannot export adapters of kinds \['Ia3Weight', 'OftWeight'\]")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    unchanged(tmp_path, lambda: lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA),
              ValueError, r"adapter_model.safetensors is missing or corrupt")


def test_vera_folders_without_projections_or_of_another_width_are_refused(tmp_path):
    model = peft.get_peft_model(torch_llama(), peft.VeraConfig(r=8, target_modules=TARGETS, save_projection=False))
    model.save_pretrained(str(tmp_path / "unsaved"))
    fn, params = jax_twin(torch_llama())
    unchanged(tmp_path, lambda: lorax.peft.load_peft(tmp_path / "unsaved", fn, params, IDS,
                                                     mapping=lorax.peft.LLAMA),
              ValueError, r"lacks \['base_model.vera_A', 'base_model.vera_B'\].*save_projection=true")
    lp = moved(lorax.init(jax.random.key(1), lorax.LoraConfig(targets=LORAX_TARGETS, **KINDS["vera"][0]),
                          fn, params, IDS))
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    weights = folder / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :-1]
    safetensors.numpy.save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"'base_model.vera_A' is \(8, (\d+)\); .* take \(8, (?!\1)\d+\)"):
        lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA, check_base=False)


@pytest.fixture(scope="module")
def smol_pair():
    """The first 2 layers of SmolLM2 from the GGUF file, in lorax and in transformers."""
    require_smollm()
    from lorax_examples import smollm
    from lorax_examples.llama import Llama

    config, params, _ = smollm.load(layers=2)
    return (lambda p, ids: Llama(config).apply(p, ids)), params, smollm.transformers_model("float32", 2).eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_real_model_adapters_travel_both_ways(kind, smol_pair, tmp_path):
    fn, params, model = smol_pair
    ids = np.array([[1, 504, 3458, 314, 4649, 28, 2]])
    lp = moved(lorax.init(jax.random.key(2), lorax.LoraConfig(targets=LORAX_TARGETS, **KINDS[kind][0]),
                          fn, params, ids), scale=0.3 if kind == "vera" else 0.05)  # VeRA's vectors move less
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    peft_model = peft.PeftModel.from_pretrained(model, str(folder)).eval()
    try:
        with torch.no_grad():
            theirs = peft_model(torch.tensor(ids)).logits.numpy()
    finally:
        peft_model.unload()  # the shared transformers model goes back to plain for the next test
    assert rel_err(lorax.lora(fn)(lp, ids), theirs) < 1e-4
    assert rel_err(fn(params, ids), theirs) > 1e-3
    back = lorax.peft.load_peft(folder, fn, params, ids, mapping=lorax.peft.LLAMA)
    assert rel_err(lorax.lora(fn)(back, ids), theirs) < 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_real_model_peft_made_adapters_import_with_equal_logits(kind, smol_pair, tmp_path):
    fn, params, model = smol_pair
    ids = np.array([[1, 504, 3458, 314, 4649, 28, 2]])
    peft_model = peft.get_peft_model(model, KINDS[kind][1]())
    try:
        torch.manual_seed(0)
        with torch.no_grad():  # trained values: every adapter array moved off its start
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_((0.3 if kind == "vera" else 0.02) * torch.randn_like(p))
            theirs = peft_model(torch.tensor(ids)).logits.numpy()
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    finally:
        peft_model.unload()
    lp = lorax.peft.load_peft(tmp_path / "adapter", fn, params, ids, mapping=lorax.peft.LLAMA)
    assert rel_err(lorax.lora(fn)(lp, ids), theirs) < 1e-4
    assert rel_err(fn(params, ids), theirs) > 1e-3
