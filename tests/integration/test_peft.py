"""PEFT interop: lorax -> PEFT folder -> PeftModel, and PEFT -> lorax, numerically; target_modules as PEFT
matches them."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import with_random_b
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import lorax
import lorax.peft
from lorax._src.io import peft_config

if os.environ.get("CI") == "true":  # CI installs the torch stack: a missing one is a failure
    import peft
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

from lorax_examples.llama import Llama, LlamaConfig, params_from_torch_names  # noqa: E402

CONFIG = LlamaConfig(vocab=96, dim=48, layers=2, heads=6, kv_heads=2, hidden=64, rope_theta=10000.0, max_len=64)
IDS = np.array([[1, 5, 7, 9, 11, 2, 3, 40]])


def torch_llama(seed=0, config=CONFIG):
    hf = transformers.LlamaConfig(
        vocab_size=config.vocab, hidden_size=config.dim, intermediate_size=config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads, rope_theta=config.rope_theta, rms_norm_eps=config.eps,
        tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.max_len)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf).eval()


def jax_twin(model, config=CONFIG):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_torch_names(config, state.__getitem__)
    return (lambda p, ids: Llama(config).apply(p, ids)), params


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def train_in_torch(model, steps=3):
    """A few SGD steps in torch, so every adapter (and module to save) is non-trivial."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(torch.tensor(IDS), labels=torch.tensor(IDS)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_base_twin_matches_transformers():
    model = torch_llama()
    fn, params = jax_twin(model)
    assert rel_err(fn(params, IDS), torch_logits(model)) < 1e-5


def test_lorax_adapter_loads_in_peft_with_equal_logits(tmp_path):
    model = torch_llama()
    fn, params = jax_twin(model)
    config = lorax.LoraConfig(rank=4, alpha=8.0, rank_pattern={r".*/v_proj/kernel": 2})
    lp = with_random_b(lorax.init(jax.random.key(1), config, fn, params, IDS), scale=0.2)
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (
        4, 8.0, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 2 for i in range(2)}
    peft_model = peft.PeftModel.from_pretrained(model, str(folder)).eval()
    ours = lorax.lora(fn)(lp, IDS)
    theirs = torch_logits(peft_model)
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(fn(params, IDS), theirs) > 1e-2  # the adapter really changes the logits


def test_peft_trained_adapter_imports_with_equal_logits(tmp_path):
    model = peft.get_peft_model(torch_llama(), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4}, use_rslora=True))
    train_in_torch(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    base = model.get_base_model()
    with model.disable_adapter():
        base_logits = torch_logits(model)
    theirs = torch_logits(model)
    state = {k.replace("base_layer.", ""): v.detach().numpy() for k, v in base.state_dict().items()
             if "lora_" not in k}
    params = params_from_torch_names(CONFIG, state.__getitem__)
    fn = lambda p, ids: Llama(CONFIG).apply(p, ids)  # noqa: E731
    np.testing.assert_allclose(fn(params, IDS), base_logits, rtol=1e-4, atol=1e-5)
    lp = lorax.peft.load_peft(tmp_path / "adapter", fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert rel_err(lorax.lora(fn)(lp, IDS), theirs) < 1e-4
    assert rel_err(base_logits, theirs) > 1e-3
    down = lp["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert down.rank == 2 and down.scale == pytest.approx(16 / np.sqrt(2))


def _exported(tmp_path):
    model = torch_llama()
    fn, params = jax_twin(model)
    lp = with_random_b(lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2, targets=r".*q_proj/kernel"),
                                  fn, params, IDS))
    return fn, params, lp, lorax.peft.save_peft(tmp_path / "a", lp, lorax.peft.LLAMA)


def test_round_trip_through_peft_files_is_exact(tmp_path):
    fn, params, lp, folder = _exported(tmp_path)
    back = lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)
    for x, y in zip(jax.tree.leaves(lorax.split(back)[0]), jax.tree.leaves(lorax.split(lp)[0])):
        np.testing.assert_array_equal(x, y)
    assert back["params"]["layers"]["self_attn"]["q_proj"]["kernel"].scale == 1.0


def test_refuses_wrong_base(tmp_path):
    fn, _, _, folder = _exported(tmp_path)
    other = LlamaConfig(vocab=96, dim=36, layers=2, heads=6, kv_heads=2, hidden=64, max_len=64)
    other_params = Llama(other).init(jax.random.key(0), jnp.asarray(IDS))
    other_fn = lambda p, ids: Llama(other).apply(p, ids)  # noqa: E731
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj': lora_A \(2, 48\) .* do not fit"):
        lorax.peft.load_peft(folder, other_fn, other_params, IDS, mapping=lorax.peft.LLAMA)


def test_refuses_truncated_safetensors(tmp_path):
    fn, params, _, folder = _exported(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing or corrupt"):
        lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("r"), "has no 'r'"),
    (lambda c: c.update(use_dora=True), "use_dora is set but lora_magnitude_vector is missing"),
    (lambda c: c.update(lora_bias=True), "lora_bias=True is not supported"),
    (lambda c: c.update(surprise=1), r"unknown adapter_config.json keys \['surprise'\]"),
    (lambda c: c.update(peft_type="BOFT"),
     r"peft_type is 'BOFT'; lorax reads \['IA3', 'LOHA', 'LOKR', 'LORA', 'OFT', 'VERA'\]"),
    (lambda c: c.update(peft_type="IA3"), r"unknown keys \[.*'lora_alpha'.*\] for peft_type 'IA3'"),
])
def test_refuses_bad_config(tmp_path, change, match):
    fn, params, _, folder = _exported(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)


def test_untied_embedding_and_head_adapters_travel_both_ways(tmp_path):
    untied = dataclasses.replace(CONFIG, tie_embeddings=False)
    hf = torch_llama(config=untied)
    fn, params = jax_twin(hf, untied)
    config = lorax.LoraConfig(rank=3, alpha=3.0, targets=r".*(embed_tokens/embedding|lm_head/kernel|q_proj/kernel)")
    lp = with_random_b(lorax.init(jax.random.key(2), config, fn, params, IDS), scale=0.2)
    folder = lorax.peft.save_peft(tmp_path / "e", lp, lorax.peft.LLAMA)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (3, 96)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (48, 3)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (96, 3)
    theirs = torch_logits(peft.PeftModel.from_pretrained(hf, str(folder)).eval())
    assert rel_err(lorax.lora(fn)(lp, IDS), theirs) < 1e-4
    back = lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert rel_err(lorax.lora(fn)(back, IDS), theirs) < 1e-4


def test_modules_to_save_travel_both_ways(tmp_path):
    untied = dataclasses.replace(CONFIG, tie_embeddings=False)
    model = peft.get_peft_model(torch_llama(config=untied), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head", "model.norm"]))
    train_in_torch(model)
    model.save_pretrained(str(tmp_path / "in"))
    theirs = torch_logits(model)
    with model.disable_adapter():
        base = torch_logits(model)
    fn, params = jax_twin(torch_llama(config=untied), untied)
    np.testing.assert_allclose(fn(params, IDS), base, rtol=1e-4, atol=1e-5)
    lp = lorax.peft.load_peft(tmp_path / "in", fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert isinstance(lp["params"]["lm_head"]["kernel"], lorax.Trainable)
    assert isinstance(lp["params"]["norm"]["scale"], lorax.Trainable)
    assert rel_err(lorax.lora(fn)(lp, IDS), theirs) < 1e-4
    # and back out: PEFT reads lorax's export of the same adapter
    folder = lorax.peft.save_peft(tmp_path / "out", lp, lorax.peft.LLAMA)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head", "model.norm"]
    again = peft.PeftModel.from_pretrained(torch_llama(config=untied), str(folder)).eval()
    assert rel_err(lorax.lora(fn)(lp, IDS), torch_logits(again)) < 1e-4


def _perturb_magnitudes(lp, seed=5):
    key = jax.random.key(seed)

    def move(x):
        if isinstance(x, lorax.DoraWeight):
            return x.replace(m=x.m * jax.random.uniform(key, x.m.shape, x.m.dtype, 0.7, 1.3))
        return x

    return jax.tree.map(move, lp, is_leaf=lambda x: isinstance(x, lorax.Adapter))


def test_lorax_dora_adapter_loads_in_peft_with_equal_logits(tmp_path):
    model = torch_llama()
    fn, params = jax_twin(model)
    config = lorax.LoraConfig(rank=4, alpha=8.0, use_dora=True)
    lp = _perturb_magnitudes(with_random_b(lorax.init(jax.random.key(1), config, fn, params, IDS), scale=0.2))
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, lorax.peft.LLAMA)
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(model, str(folder)).eval()
    ours, theirs = lorax.lora(fn)(lp, IDS), torch_logits(peft_model)
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(fn(params, IDS), theirs) > 1e-2
    back = lorax.peft.load_peft(folder, fn, params, IDS, mapping=lorax.peft.LLAMA)
    assert rel_err(lorax.lora(fn)(back, IDS), theirs) < 1e-4


def test_peft_trained_dora_adapter_imports_with_equal_logits(tmp_path):
    model = peft.get_peft_model(torch_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], lora_dropout=0.0, use_dora=True))
    train_in_torch(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    with model.disable_adapter():
        base_logits = torch_logits(model)
    theirs = torch_logits(model)
    state = {k.replace("base_layer.", ""): v.detach().numpy() for k, v in model.get_base_model().state_dict().items()
             if "lora_" not in k}
    params = params_from_torch_names(CONFIG, state.__getitem__)
    fn = lambda p, ids: Llama(CONFIG).apply(p, ids)  # noqa: E731
    lp = lorax.peft.load_peft(tmp_path / "adapter", fn, params, IDS, mapping=lorax.peft.LLAMA)
    q = lp["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, lorax.DoraWeight)
    assert rel_err(lorax.lora(fn)(lp, IDS), theirs) < 1e-4
    assert rel_err(base_logits, theirs) > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapter_exports_as_lora_on_the_original_base(tmp_path, init):
    model = torch_llama()
    fn, params = jax_twin(model)
    config = lorax.LoraConfig(rank=4, alpha=4.0, init=init, targets=r".*(q|v|down)_proj/kernel")
    lp = lorax.init(jax.random.key(1), config, fn, params, IDS)
    initial = lorax.split(lp)[0]
    trained = with_random_b(lp, scale=0.05)  # stands for training: the factors moved
    folder = lorax.peft.save_peft(tmp_path / "adapter", trained, lorax.peft.LLAMA, initial=initial)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 8.0)  # rank 2r, the scale kept
    peft_model = peft.PeftModel.from_pretrained(model, str(folder)).eval()  # the ORIGINAL base
    theirs = torch_logits(peft_model)
    assert rel_err(lorax.lora(fn)(trained, IDS), theirs) < 1e-4
    assert rel_err(fn(params, IDS), theirs) > 1e-3
    with pytest.raises(ValueError, match="`initial` has no adapter at"):
        lorax.peft.save_peft(tmp_path / "bad", trained, lorax.peft.LLAMA, initial={})


NAMES = st.lists(st.sampled_from(["q_proj", "v_proj", "proj", "layers.0.q_proj", "lm_head", "mlp"]), max_size=3)


@settings(max_examples=80, deadline=None)
@given(targets=NAMES | st.sampled_from([r".*q_proj", r"model\..*", "lm_head"]),
       exclude=st.none() | NAMES | st.sampled_from([r".*\.0\..*"]),
       saved=st.none() | st.lists(st.sampled_from(["lm_head", "proj"]), max_size=2),
       module=st.sampled_from(["model.layers.0.q_proj", "model.layers.1.v_proj", "lm_head", "model.proj",
                               "model.layers.0.mlp.up_proj"]))
def test_target_modules_match_peft_exactly(targets, exclude, saved, module):
    check = pytest.importorskip("peft.tuners.tuners_utils").check_target_module_exists
    theirs = types.SimpleNamespace(target_modules=targets, exclude_modules=exclude, modules_to_save=saved,
                                   target_parameters=None, layers_to_transform=None, layers_pattern=None)
    ours = {"target_modules": targets, "exclude_modules": exclude, "modules_to_save": saved}
    assert peft_config.targeted(ours, module) == bool(check(theirs, module))
