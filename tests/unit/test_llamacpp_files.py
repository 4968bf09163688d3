"""llama.cpp adapter export: the file read back with gguf's reader (names, shapes, alpha, permuted
deltas), refused input and failed writes leaving the old file."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, with_random_b
from lorax_examples import llama, smollm

import lorax
import lorax.llamacpp

gguf = pytest.importorskip("gguf")

CONFIG = llama.LlamaConfig(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, hidden=48, remat=False)
MODEL = llama.Llama(CONFIG)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def fn(p, ids):
    return MODEL.apply(p, ids)


@pytest.fixture(scope="module")
def adapted():
    ids = jnp.zeros((1, 4), jnp.int32)
    base = MODEL.init(jax.random.key(1), ids)
    config = lorax.LoraConfig(rank=4, alpha=8.0, targets="all-linear", rank_pattern={".*/down_proj/.*": 2})
    return base, with_random_b(lorax.init(KEY, config, fn, base, ids))


def save(tmp_path, params, **kw):
    kw.setdefault("heads", (CONFIG.heads, CONFIG.kv_heads))
    return lorax.llamacpp.save_adapter(tmp_path / "adapter.gguf", params, smollm.LLAMACPP_NAMES, **kw)


def torch_weight(params, path, layer):
    node = params["params"]["layers"]
    for key in path.split("/"):
        node = node[key]
    return np.asarray(node["kernel"][layer]).T  # [out, in], as llama.cpp's converter sees it


def test_written_file_holds_llama_cpp_names_shapes_alpha_and_permuted_deltas(tmp_path, adapted):
    base, params = adapted
    reader = gguf.GGUFReader(str(save(tmp_path, params)))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert [fields[k] for k in ("general.type", "general.architecture", "adapter.type")] == ["adapter", "llama", "lora"]
    assert fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for p in PROJECTIONS for ab in "ab"}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    merged = lorax.merge(params)
    for name, torch in smollm._NAMES.items():
        if name not in PROJECTIONS:
            continue
        for i in range(2):
            a, b = (tensors[f"blk.{i}.{name}.weight.lora_{ab}"] for ab in "ab")
            delta = torch_weight(merged, torch.replace(".", "/"), i) - torch_weight(base, torch.replace(".", "/"), i)
            out, inp = delta.shape
            rank = 2 if name == "ffn_down" else 4
            assert a.shape.tolist() == [inp, rank] and b.shape.tolist() == [rank, out]  # ggml ne: [in, r], [r, out]
            product = 8.0 / rank * b.data.reshape(out, rank) @ a.data.reshape(rank, inp)  # llama.cpp: alpha/r·B·A
            if name in ("attn_q", "attn_k"):  # llama.cpp stores these rows permuted; the example's loader undoes it
                product = smollm._unpermute(product, CONFIG.heads if name == "attn_q" else CONFIG.kv_heads)
            np.testing.assert_allclose(product, delta, rtol=1e-4, atol=1e-6)


def test_scales_unlike_the_files_alpha_are_folded_into_b(tmp_path, adapted):
    _, params = adapted
    q = params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    changed = jax.tree.map(lambda x: x, params)
    changed["params"]["layers"]["self_attn"]["q_proj"]["kernel"] = dataclasses.replace(q, scale=q.scale * 3)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(save(tmp_path, changed))).tensors}
    reference = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(save(tmp_path / "ref", params))).tensors}
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight.lora_b"], 3 * reference["blk.1.attn_q.weight.lora_b"],
                               rtol=1e-6)
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"], reference["blk.1.attn_v.weight.lora_b"])


def test_rope_permute_inverts_the_loaders_unpermute():
    w = np.random.default_rng(0).normal(size=(24, 5))
    np.testing.assert_array_equal(smollm._unpermute(lorax.llamacpp.rope_permute(w, 3), 3), w)


@pytest.mark.parametrize("change, message", [
    ("dora", "'params/layers/self_attn/q_proj/kernel' is a DoraWeight (dora); llama.cpp adapters are plain LoRA"),
    ("names", "the name map gives no llama.cpp tensor for 'params/layers/mlp/up_proj/kernel' layer (0,)"),
    ("heads", "heads must be (n_head, n_head_kv)"),
    ("clash", "both map to 'blk.0.attn_q.weight'"),
])
def test_bad_input_is_refused_and_leaves_the_old_file(tmp_path, adapted, change, message):
    base, params = adapted
    path = save(tmp_path, params)
    before = path.read_bytes()
    names, kw = dict(smollm.LLAMACPP_NAMES), {}
    if change == "dora":
        config = lorax.LoraConfig(rank=2, targets=r".*/q_proj/kernel", use_dora=True)
        params = lorax.init(KEY, config, fn, base, jnp.zeros((1, 4), jnp.int32))
    elif change == "names":
        del names["params/layers/mlp/up_proj/kernel"]
    elif change == "heads":
        kw["heads"] = (4,)
    else:
        names["params/layers/self_attn/k_proj/kernel"] = names["params/layers/self_attn/q_proj/kernel"]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lorax.llamacpp.save_adapter(path, params, names, **{"heads": (4, 2), **kw})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["adapter.gguf"]


def test_a_failed_write_leaves_the_old_file(tmp_path, adapted, monkeypatch):
    _, params = adapted
    path = save(tmp_path, params)
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, with_random_b(params, key=jax.random.key(5)), overwrite=True)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["adapter.gguf"]
