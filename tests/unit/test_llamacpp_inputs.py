"""llama.cpp export: what it refuses (and leaves on disk), and the file it writes: never over an
existing file without overwrite=True, with the permissions a plain open() would give."""

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
HEADS = (CONFIG.heads, CONFIG.kv_heads)
Q = "params/layers/self_attn/q_proj/kernel"
V = "params/layers/self_attn/v_proj/kernel"


def fn(p, ids):
    return MODEL.apply(p, ids)


def adapted(targets):
    ids = jnp.zeros((1, 4), jnp.int32)
    config = lorax.LoraConfig(rank=4, alpha=8.0, targets=targets)
    return with_random_b(lorax.init(KEY, config, fn, MODEL.init(jax.random.key(1), ids), ids))


@pytest.fixture(scope="module")
def params():
    return adapted(r".*/(q|v)_proj/kernel")


@pytest.fixture(scope="module")
def qk():
    return adapted(r".*/(q|k)_proj/kernel")


def listing(folder):
    """Every file in ``folder`` with its mode and bytes."""
    return {name: (os.stat(folder / name).st_mode, (folder / name).read_bytes()) for name in sorted(os.listdir(folder))}


def tensors(path):
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_an_existing_file_is_refused_without_overwrite(tmp_path, params):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF a released model")
    before = listing(tmp_path)
    with pytest.raises(FileExistsError, match=f"'{model}' already exists; pass overwrite=True to replace it"):
        lorax.llamacpp.save_adapter(model, params, smollm.LLAMACPP_NAMES, heads=HEADS)
    assert listing(tmp_path) == before
    lorax.llamacpp.save_adapter(model, params, smollm.LLAMACPP_NAMES, heads=HEADS, overwrite=True)
    assert set(tensors(model)) == {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for p in ("attn_q", "attn_v")
                                   for ab in "ab"}
    with pytest.raises(TypeError, match="overwrite must be True or False, got 1"):
        lorax.llamacpp.save_adapter(tmp_path / "new.gguf", params, smollm.LLAMACPP_NAMES, heads=HEADS, overwrite=1)
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, params, umask, mode):
    old = os.umask(umask)
    try:
        path = lorax.llamacpp.save_adapter(tmp_path / "a.gguf", params, smollm.LLAMACPP_NAMES, heads=HEADS)
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(mode) == oct((tmp_path / "plain").stat().st_mode & 0o777)


def test_an_overwritten_file_keeps_its_mode(tmp_path, params):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"old")
    path.chmod(0o640)
    lorax.llamacpp.save_adapter(path, params, smollm.LLAMACPP_NAMES, heads=HEADS, overwrite=True)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640) and path.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == ["a.gguf"]


def test_q_and_k_without_heads_are_refused_and_heads_false_keeps_rows(tmp_path, params):
    with pytest.raises(ValueError, match=rf"'{Q}' layer \(0,\) maps to 'blk.0.attn_q.weight', whose rows llama.cpp's "
                                         r"converter permutes .* pass heads=\(n_head, n_head_kv\)"):
        lorax.llamacpp.save_adapter(tmp_path / "a.gguf", params, smollm.LLAMACPP_NAMES)
    assert os.listdir(tmp_path) == []
    plain = tensors(lorax.llamacpp.save_adapter(tmp_path / "a.gguf", params, smollm.LLAMACPP_NAMES, heads=False))
    permuted = tensors(lorax.llamacpp.save_adapter(tmp_path / "b.gguf", params, smollm.LLAMACPP_NAMES, heads=HEADS))
    b = plain["blk.1.attn_q.weight.lora_b"]  # [out, r]: the rows as the checkpoint holds them
    np.testing.assert_array_equal(permuted["blk.1.attn_q.weight.lora_b"], lorax.llamacpp.rope_permute(b, CONFIG.heads))
    assert not np.array_equal(b, permuted["blk.1.attn_q.weight.lora_b"])
    np.testing.assert_array_equal(plain["blk.1.attn_v.weight.lora_b"], permuted["blk.1.attn_v.weight.lora_b"])


def test_numpy_heads_write_the_same_file(tmp_path, params):
    ints = lorax.llamacpp.save_adapter(tmp_path / "a.gguf", params, smollm.LLAMACPP_NAMES, heads=HEADS)
    numpy = lorax.llamacpp.save_adapter(tmp_path / "b.gguf", params, smollm.LLAMACPP_NAMES,
                                        heads=(np.int64(4), np.int32(2)))
    assert ints.read_bytes() == numpy.read_bytes()


@pytest.mark.parametrize("heads, message", [
    ((3, 2), rf"'{Q}' layer \(0,\) maps to 'blk.0.attn_q.weight' with lora_b of shape \(32, 4\) \[out, rank\]: "
             r"32 rows do not split into 3 heads of two rotary halves"),
    ((4, 5), r"maps to 'blk.0.attn_k.weight' with lora_b of shape \(16, 4\) .* 16 rows do not split into 5 heads"),
    ((True, 2), r"heads must be \(n_head, n_head_kv\), two positive ints, or False; got \(True, 2\)"),
    ((4,), r"heads must be \(n_head, n_head_kv\)"),
    ((4.0, 2), r"heads must be \(n_head, n_head_kv\)"),
    ((0, 2), r"heads must be \(n_head, n_head_kv\)"),
    ("42", r"heads must be \(n_head, n_head_kv\)"),
    (True, r"heads must be \(n_head, n_head_kv\), two positive ints, or False; got True"),
])
def test_bad_heads_are_refused_and_nothing_is_written(tmp_path, qk, heads, message):
    with pytest.raises(ValueError, match=message):
        lorax.llamacpp.save_adapter(tmp_path / "a.gguf", qk, smollm.LLAMACPP_NAMES, heads=heads)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("arch", [None, "", 3])
def test_arch_is_required(tmp_path, params, arch):
    with pytest.raises(ValueError, match=rf"arch must be the base model's general.architecture, a non-empty str "
                                         rf"such as 'llama'; got {arch!r}"):
        lorax.llamacpp.save_adapter(tmp_path / "a.gguf", params, smollm.LLAMACPP_NAMES, heads=HEADS, arch=arch)
    assert os.listdir(tmp_path) == []


def names_with(path, template):
    return {**smollm.LLAMACPP_NAMES, path: template}


@pytest.mark.parametrize("names, error, message", [
    ([(Q, "blk.{i}.attn_q.weight")], TypeError, r"names must be a dict \{lorax path: llama.cpp tensor name\} or a "
                                                r"function \(path, layer index\) -> name, got list"),
    ("blk.{i}.attn_q.weight", TypeError, r"names must be a dict .* got str"),
    (names_with(V, 7), TypeError, rf"names must map str lorax paths to non-empty str tensor names; got "
                                  rf"names\['{V}'\] = 7"),
    (names_with(V, ""), TypeError, rf"names\['{V}'\] = ''"),
    ({**smollm.LLAMACPP_NAMES, 3: "x"}, TypeError, r"names\[3\] = 'x'"),
    (names_with(V, "blk.{i.attn_v.weight"), ValueError, rf"names\['{V}'\] = 'blk.{{i.attn_v.weight' is not a valid "
                                                        "template"),
    (names_with(V, "blk.{layer}.attn_v.weight"), ValueError, rf"names\['{V}'\] = 'blk.{{layer}}.attn_v.weight' uses "
                                                             r"\{layer\}; a template may use only \{i\}"),
    (names_with(V, "blk.{i!r}.attn_v.weight"), ValueError, r"may use only \{i\}"),
    (names_with(V, "blk.{0}.attn_v.weight"), ValueError, r"uses \{0\}; a template may use only \{i\}"),
    (names_with(V, "blk.0.attn_v.weight"), ValueError, rf"names\['{V}'\] = 'blk.0.attn_v.weight' for '{V}' layer "
                                                       r"\(0,\): a stacked weight needs \{i\} in its template"),
    (lambda path, index: 5, TypeError, rf"names\('{Q}', \(0,\)\) returned 5; it must return a non-empty str"),
])
def test_malformed_names_are_refused(tmp_path, params, names, error, message):
    with pytest.raises(error, match=message):
        lorax.llamacpp.save_adapter(tmp_path / "a.gguf", params, names, heads=HEADS)
    assert os.listdir(tmp_path) == []


def test_a_layer_template_on_an_unstacked_weight_is_refused(tmp_path):
    f = lambda p, x: x @ p["q"]  # noqa: E731
    one = lorax.init(KEY, lorax.LoraConfig(rank=2), f, {"q": jnp.ones((4, 6))}, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"names\['q'\] = 'blk.{i}.attn_v.weight' for 'q': \{i\} is the layer of a "
                                         "stacked weight, and this weight is not stacked"):
        lorax.llamacpp.save_adapter(tmp_path / "a.gguf", one, {"q": "blk.{i}.attn_v.weight"})
    assert os.listdir(tmp_path) == []
    path = lorax.llamacpp.save_adapter(tmp_path / "a.gguf", one, {"q": "blk.0.attn_v.weight"})
    assert set(tensors(path)) == {"blk.0.attn_v.weight.lora_a", "blk.0.attn_v.weight.lora_b"}
