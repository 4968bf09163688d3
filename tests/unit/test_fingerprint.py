"""Checkpoints and PEFT folders know the base they were trained on: a merged, re-seeded or other base
is refused, naming the weight and both fingerprints; ``check_base=False`` overrides; older files load."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import lorax
import lorax.peft
from lorax._src.io.records import SAMPLES, base_mismatch, fingerprint

MAPPING = [(r"(?P<m>q|v)_proj/kernel", "layer.{m}_proj")]
X = jnp.ones((2, 16))


def fn(p, x):
    return (x @ p["q_proj"]["kernel"]) @ p["v_proj"]["kernel"]


def make_base(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"q_proj": {"kernel": jax.random.normal(k1, (16, 8)) * 0.1},
            "v_proj": {"kernel": jax.random.normal(k2, (8, 4)) * 0.1}}


def adapted(base, **config):
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2, **config), fn, base, X)
    return jax.tree.map(lambda n: n.replace(b=0.1 * jnp.ones_like(n.b)) if isinstance(n, lorax.LoraWeight) else n,
                        lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))


def test_fingerprint_is_norm_and_evenly_spaced_samples():
    w = jnp.arange(64.0).reshape(8, 8)
    record = fingerprint(w)
    assert record["norm"] == pytest.approx(float(jnp.linalg.norm(w)), rel=1e-6)
    assert record["sample"] == [float(2 * i + 1) * 64 // 32 for i in range(SAMPLES)]  # flat positions 2, 6, ...
    assert fingerprint(jnp.zeros((0, 3))) == {"norm": 0.0, "sample": []}
    assert fingerprint(jnp.array([jnp.nan, jnp.inf]))["sample"] == ["nan", "inf"]  # JSON has no such numbers


def test_tiny_float_differences_pass_and_real_changes_do_not():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    record = fingerprint(w)
    assert base_mismatch(record, w * (1 + 1e-6)) is None  # another device's rounding
    assert base_mismatch(record, w * 1.01) is not None
    assert base_mismatch(record, w.at[10, 0].add(0.01)) is not None  # one sampled value (flat 320), norm alike
    bf16 = w.astype(jnp.bfloat16)
    assert base_mismatch(fingerprint(bf16), bf16) is None
    assert base_mismatch(fingerprint(bf16), (bf16.astype(jnp.float32) * 1.05).astype(jnp.bfloat16)) is not None


def test_merged_base_is_refused_naming_the_weight_and_override_loads(tmp_path):
    base = make_base()
    lp = adapted(base)
    lorax.save(tmp_path, lp)
    merged = lorax.merge(lp)
    with pytest.raises(ValueError, match=r"(?s)not the one the adapters of step 0 .* were trained on:\n"
                                         r"  q_proj/kernel: recorded norm [0-9.]+ and values \[.*found norm.*\n"
                                         r"  v_proj/kernel: recorded.*check_base=False"):
        lorax.load(tmp_path, merged)
    wrong = lorax.load(tmp_path, merged, check_base=False)  # the override: adapters on the merged weights
    np.testing.assert_array_equal(wrong["q_proj"]["kernel"].w, merged["q_proj"]["kernel"])
    right = lorax.load(tmp_path, base)
    np.testing.assert_allclose(lorax.lora(fn)(right, X), lorax.lora(fn)(lp, X), rtol=1e-6)


def test_another_seed_is_refused(tmp_path):
    lorax.save(tmp_path, adapted(make_base(0)))
    with pytest.raises(ValueError, match=r"q_proj/kernel: recorded norm .* found norm"):
        lorax.load(tmp_path, make_base(1))


def test_one_changed_weight_is_named_alone(tmp_path):
    base = make_base()
    lorax.save(tmp_path, adapted(base))
    other = {**base, "v_proj": {"kernel": base["v_proj"]["kernel"] * 1.5}}
    with pytest.raises(ValueError, match="v_proj/kernel") as err:
        lorax.load(tmp_path, other)
    assert "q_proj/kernel" not in str(err.value)


def test_checkpoint_without_fingerprint_loads_unchecked(tmp_path):
    base = make_base()
    folder = lorax.save(tmp_path, adapted(base))
    meta = folder / "meta" / "metadata"
    record = json.loads(meta.read_text())
    assert all("base" in e for e in record["weights"])
    for e in record["weights"]:
        del e["base"]  # as written before fingerprints
    meta.write_text(json.dumps(record))
    back = lorax.load(tmp_path, make_base(1))  # nothing to check against
    np.testing.assert_array_equal(back["q_proj"]["kernel"].w, make_base(1)["q_proj"]["kernel"])


@pytest.mark.parametrize("value, field", [
    ({"norm": 1.0}, "weights\\[0\\].base"),
    ({"norm": "big", "sample": [0.0] * SAMPLES}, "weights\\[0\\].base"),
    ({"norm": 1.0, "sample": [0.0] * 3}, "weights\\[0\\].base"),
    ({"norm": 1.0, "sample": [0.0] * SAMPLES, "extra": 1}, "weights\\[0\\].base"),
])
def test_damaged_fingerprint_is_refused_naming_the_field(tmp_path, value, field):
    folder = lorax.save(tmp_path, adapted(make_base()))
    meta = folder / "meta" / "metadata"
    record = json.loads(meta.read_text())
    record["weights"][0]["base"] = value
    meta.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"{field} must be a base fingerprint"):
        lorax.load(tmp_path, make_base())


def test_quantized_base_is_fingerprinted_by_its_dequantized_value(tmp_path):
    base = make_base()
    quantized = lorax.quantize(base, "int8")
    lorax.save(tmp_path, adapted(quantized))
    record = json.loads((tmp_path / "0" / "meta" / "metadata").read_text())
    assert record["weights"][0]["base"]["format"] == "int8"
    lorax.load(tmp_path, quantized)
    lorax.load(tmp_path, base)  # the full-precision original: only the norm is compared across formats
    with pytest.raises(ValueError, match=r"q_proj/kernel: recorded norm [0-9.]+ \(int8\)"):
        lorax.load(tmp_path, lorax.quantize(make_base(1), "int8"))
    with pytest.raises(ValueError, match=r"q_proj/kernel: recorded norm [0-9.]+ \(int8\) .* found norm [0-9.]+ and"):
        lorax.load(tmp_path, jax.tree.map(lambda w: 2 * w, base))


def test_pissa_residual_is_checked_on_the_original_base(tmp_path):
    base = make_base()
    lorax.save(tmp_path, adapted(base, init="pissa"))
    lorax.load(tmp_path, base)
    with pytest.raises(ValueError, match=r"q_proj/kernel \(its PiSSA/OLoRA residual\): recorded"):
        lorax.load(tmp_path, make_base(1))


def test_nnx_merged_model_is_refused_and_a_fresh_model_restores_outputs(tmp_path):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    model = Model(nnx.Rngs(0))
    graphdef, base, rest = nnx.split(model, nnx.Param, ...)
    forward = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
    params = lorax.init(jax.random.key(2), lorax.LoraConfig(rank=2), forward, base, X)
    kernel = params["up"]["kernel"].get_value()
    params["up"]["kernel"].set_value(kernel.replace(b=jnp.ones_like(kernel.b)))
    before = lorax.lora(forward)(params, X)
    lorax.save(tmp_path, params)
    nnx.update(model, lorax.merge(params))  # `base` holds the model's own variables: now merged too
    with pytest.raises(ValueError, match="up/kernel: recorded norm"):
        lorax.load(tmp_path, base)
    _, fresh, _ = nnx.split(Model(nnx.Rngs(0)), nnx.Param, ...)
    after = lorax.lora(forward)(lorax.load(tmp_path, fresh), X)
    np.testing.assert_allclose(after, before, rtol=1e-6)


# ----------------------------------------------------------------------------------------- PEFT folders


def test_peft_folder_refuses_a_merged_base_and_loads_with_override(tmp_path):
    base = make_base()
    lp = adapted(base)
    out = lorax.peft.save_peft(tmp_path / "a", lp, MAPPING)
    merged = lorax.merge(lp)
    with pytest.raises(ValueError, match=r"(?s)not the one .* was saved from:\n  layer.q_proj \('q_proj/kernel'\): "
                                         r"recorded norm .* found norm.*check_base=False"):
        lorax.peft.load_peft(out, fn, merged, X, mapping=MAPPING)
    with pytest.raises(ValueError, match="layer.v_proj"):
        lorax.peft.load_peft(out, fn, make_base(1), X, mapping=MAPPING)
    lorax.peft.load_peft(out, fn, merged, X, mapping=MAPPING, check_base=False)
    back = lorax.peft.load_peft(out, fn, base, X, mapping=MAPPING)
    np.testing.assert_allclose(lorax.lora(fn)(back, X), lorax.lora(fn)(lp, X), rtol=1e-5)


def test_peft_fingerprint_is_of_the_original_base_for_pissa(tmp_path):
    base = make_base()
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2, init="pissa"), fn, base, X)
    out = lorax.peft.save_peft(tmp_path / "a", lp, MAPPING, initial=lorax.split(lp)[0])
    back = lorax.peft.load_peft(out, fn, base, X, mapping=MAPPING)  # plain LoRA on the original weights
    np.testing.assert_allclose(lorax.lora(fn)(back, X), lorax.lora(fn)(lp, X), rtol=1e-4, atol=1e-6)


def test_peft_folder_without_fingerprints_loads_unchecked(tmp_path):
    out = lorax.peft.save_peft(tmp_path / "a", adapted(make_base()), MAPPING)
    file = out / "adapter_model.safetensors"
    save_file(load_file(file), file, metadata={"format": "pt"})  # as PEFT itself writes it
    lorax.peft.load_peft(out, fn, make_base(1), X, mapping=MAPPING)


@pytest.mark.parametrize("text, match", [
    ("{not json", "'lorax_base' metadata is unreadable"),
    ('["q"]', "'lorax_base' metadata must map module names to base fingerprints"),
    ('{"layer.q_proj": {"norm": 1.0, "sample": []}}', r"lorax_base\['layer.q_proj'\] is not a base fingerprint "
                                                      r"of a \(16, 8\) weight"),
])
def test_peft_damaged_fingerprints_are_refused(tmp_path, text, match):
    out = lorax.peft.save_peft(tmp_path / "a", adapted(make_base()), MAPPING)
    file = out / "adapter_model.safetensors"
    save_file(load_file(file), file, metadata={"format": "pt", "lorax_base": text})
    with pytest.raises(ValueError, match=match):
        lorax.peft.load_peft(out, fn, make_base(), X, mapping=MAPPING)


def test_bank_load_checks_every_adapter_base_and_takes_the_override(tmp_path):
    base = make_base()
    bank = lorax.adapters.bank({"one": adapted(base), "two": adapted(base, alpha=4.0)})
    lorax.adapters.save(tmp_path, bank)
    other = make_base(seed=3)
    with pytest.raises(ValueError, match=r"(?s)q_proj/kernel: recorded.*check_base=False"):
        lorax.adapters.load(tmp_path, other)
    back = lorax.adapters.load(tmp_path, other, check_base=False)
    assert lorax.adapters.names(back) == ("one", "two")
    np.testing.assert_array_equal(lorax.adapters.base(back)["q_proj"]["kernel"], other["q_proj"]["kernel"])
