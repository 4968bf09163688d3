"""Two PEFT adapters of one torch LLaMA in one lorax bank: switching and mixing give PEFT's logits."""

import os

import jax
import numpy as np
import pytest
from test_peft import CONFIG, jax_twin, rel_err, torch_llama

import lorax
import lorax.peft
from lorax import adapters

if os.environ.get("CI") == "true":
    import peft
    import torch
else:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

IDS = np.array([[1, 5, 7, 9, 11, 2, 3, 40], [4, 8, 15, 16, 23, 42, 6, 2]])


def two_adapter_model():
    """PEFT's own multi-adapter model: "default" (r=4 on q, v) and "terse" (r=2, alpha 8, q k v o)."""
    model = peft.get_peft_model(torch_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("terse", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero updates for both adapters
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def peft_logits(model, name):
    model.set_adapter(name)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_two_peft_adapters_switch_and_mix_with_peft_logits(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path / "saved")  # "default" in the folder, "terse" in saved/terse
    assert (tmp_path / "saved" / "terse" / "adapter_config.json").is_file()
    fn, params = jax_twin(torch_llama(), CONFIG)  # the same seed: the base under both adapters
    bank = adapters.load_peft(tmp_path / "saved", fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert adapters.names(bank) == ("default", "terse")
    want = {name: peft_logits(model, name) for name in ("default", "terse")}
    forward = lorax.lora(fn)
    for name in want:
        assert rel_err(forward(adapters.route(bank, name), IDS), want[name]) < 1e-5
    mixed = np.asarray(forward(adapters.route(bank, ["terse", "default"]), IDS))
    assert rel_err(mixed[0], want["terse"][0]) < 1e-5 and rel_err(mixed[1], want["default"][1]) < 1e-5

    adapters.save_peft(tmp_path / "export", bank, lorax.peft.LLAMA)  # PEFT's layout, read back by PEFT
    again = peft.PeftModel.from_pretrained(torch_llama(), tmp_path / "export")
    again.load_adapter(tmp_path / "export" / "terse", adapter_name="terse")
    for name in want:
        assert rel_err(peft_logits(again.eval(), name), want[name]) < 1e-5
    # one verb: lorax.peft takes the bank tree too, and reads a folder of sub-folders back as a bank
    lorax.peft.save_peft(tmp_path / "verb", bank, lorax.peft.LLAMA)
    listing = lambda folder: sorted(p.name for p in folder.iterdir())  # noqa: E731
    assert listing(tmp_path / "verb") == listing(tmp_path / "export")
    lorax.peft.save_peft(tmp_path / "named", adapters.rename(bank, "default", "full"), lorax.peft.LLAMA)
    back = lorax.peft.load_peft(tmp_path / "named", fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert adapters.names(back) == ("full", "terse")
    assert rel_err(forward(adapters.route(back, "full"), IDS), want["default"]) < 1e-5


def two_equal_rank_adapters():
    """"default" (alpha 8) and "b" (alpha 16), both r=4 on q and v: what PEFT's factor-level merges need."""
    model = peft.get_peft_model(torch_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


MERGE_TYPES = [("ties", 0.5, "total"), ("ties", 0.3, "frequency"), ("magnitude_prune", 0.5, "total"),
               ("ties_svd", 0.4, "total"), ("magnitude_prune_svd", 0.6, "total"),
               ("dare_linear", 1.0, "total"), ("dare_ties", 1.0, "frequency"), ("dare_ties_svd", 1.0, "total")]


def test_model_merging_types_give_peft_logits(tmp_path):
    """ties, magnitude_prune and their _svd forms against PEFT's add_weighted_adapter; DARE with
    density 1 (no random drop: its election and averaging), the random drop in the unit tests."""
    model = two_equal_rank_adapters()
    model.save_pretrained(tmp_path / "saved")
    fn, params = jax_twin(torch_llama(), CONFIG)
    bank = adapters.load_peft(tmp_path / "saved", fn, params, IDS, mapping=lorax.peft.LLAMA)
    forward = lorax.lora(fn)
    for n, (how, density, sign) in enumerate(MERGE_TYPES):
        name = f"mix{n}"
        model.add_weighted_adapter(["default", "b"], [0.7, -0.4], name, combination_type=how, density=density,
                                   majority_sign_method=sign)
        key = {"key": jax.random.key(n)} if how.startswith("dare") else {}
        mixed = adapters.weighted(bank, name, ["default", "b"], [0.7, -0.4], how=how, density=density,
                                  majority_sign_method=sign, **key)
        theirs = peft_logits(model, name)
        assert rel_err(forward(adapters.route(mixed, name), IDS), theirs) < 1e-4, how
        assert rel_err(peft_logits(model, "default"), theirs) > 1e-3, how
