"""Adapter checkpoints: exact round trip, refusal of a wrong base, retention; steps that never lose
data, bad arguments, damaged or missing metadata and interrupted writes, each changing nothing on disk;
the training state saved alongside."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import QV_BASE as BASE
from helpers import adapted_gpt as _adapted
from helpers import examples, lock_held_by_another_process, unchanged, with_random_b
from helpers import qv_adapted as adapted
from helpers import qv_b as b_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorax
from lorax._src.io import checkpoint


def test_round_trip_is_exact_and_writes_only_adapters(tmp_path):
    fn, params, lp, x = _adapted()
    folder = lorax.save(tmp_path / "ckpt", lp, step=7, config=lorax.LoraConfig(rank=2, use_rslora=True))
    record = json.loads((folder / "meta" / "metadata").read_text())
    assert record["config"]["use_rslora"] is True and record["config"]["targets"] == "all-linear"
    entry = next(e for e in record["weights"] if e["path"] == "params/h/out/kernel")
    assert (entry["a_axes"], entry["b_axes"], entry["stack_axes"], entry["scale"]) == ([1, 2], [3], [0], 3.0)
    back = lorax.load(tmp_path / "ckpt", params)
    assert jax.tree.structure(back, is_leaf=lambda n: isinstance(n, lorax.LoraWeight)) == \
        jax.tree.structure(lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lorax.lora(fn)(back, x), lorax.lora(fn)(lp, x))
    written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    base_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
    adapter_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(lorax.split(lp)[0]))
    assert written < adapter_bytes + 0.5 * base_bytes  # the frozen base is not in it


def test_wrong_base_is_refused_listing_every_mismatch(tmp_path):
    _, params, lp, _ = _adapted()
    lorax.save(tmp_path / "ckpt", lp)
    other = jax.tree.map(lambda x: x, params)
    h = other["params"]["h"]
    h["query"]["kernel"] = h["query"]["kernel"][:, :16]
    h["value"]["kernel"] = h["value"]["kernel"].astype(jnp.bfloat16)
    del h["key"]
    with pytest.raises(ValueError) as err:
        lorax.load(tmp_path / "ckpt", other)
    msg = str(err.value)
    assert "params/h/key/kernel: not in the base" in msg
    assert "params/h/query/kernel: base has (2, 16, 4, 8) float32, the adapter was saved for (2, 32, 4, 8)" in msg
    assert "params/h/value/kernel: base has (2, 32, 4, 8) bfloat16" in msg


def test_retention_keeps_newest_steps_and_load_takes_latest(tmp_path):
    _, params, lp, _ = _adapted()
    for step in range(4):
        lorax.save(tmp_path / "run", with_random_b(lp, jax.random.key(step)), step=step, keep=2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["2", "3"]
    latest = lorax.load(tmp_path / "run", params)
    expected = with_random_b(lp, jax.random.key(3))
    np.testing.assert_array_equal(latest["params"]["h"]["fc"]["kernel"].b,
                                  expected["params"]["h"]["fc"]["kernel"].b)


def test_step_defaults_to_latest_plus_one_and_existing_step_needs_overwrite(tmp_path):
    assert lorax.save(tmp_path, adapted(0)).name == "0"
    assert lorax.save(tmp_path, adapted(1)).name == "1"
    unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(2), step=1), ValueError,
              r"step 1 already exists in .*overwrite=True")
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE)), b_of(adapted(1)))
    lorax.save(tmp_path, adapted(2), step=1, overwrite=True)
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE)), b_of(adapted(2)))
    assert {p.name for p in tmp_path.iterdir()} == {"0", "1", ".lorax.lock"}  # no staging left behind


def test_lower_step_is_refused_unless_overwrite(tmp_path):
    lorax.save(tmp_path, adapted(0), step=5)
    unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(1), step=3), ValueError,
              r"step 3 is lower than the latest step 5 .*`load` would keep returning step 5")
    lorax.save(tmp_path, adapted(1), step=3, overwrite=True)
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE, step=3)), b_of(adapted(1)))
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE)), b_of(adapted(0)))  # highest step wins


def test_a_refused_step_does_not_even_add_a_lock_file(tmp_path):
    lorax.save(tmp_path, adapted(0))
    (tmp_path / ".lorax.lock").unlink()  # a folder written before lorax locked folders
    unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(1), step=0), ValueError, "step 0 already exists")


def test_keep_never_deletes_the_step_just_written(tmp_path):
    for step in range(3):
        lorax.save(tmp_path, adapted(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1", "2"]
    lorax.save(tmp_path, adapted(7), step=0, overwrite=True, keep=1)  # never deletes the newer steps 1 and 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE, step=0)), b_of(adapted(7)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep=0), ValueError, "keep must be a positive int, got 0"),
    (dict(keep=True), TypeError, "keep must be a positive int, got True"),
    (dict(step=1.5), TypeError, r"step must be a non-negative int, got 1.5 \(float\)"),
    (dict(step=-1), ValueError, "step must be a non-negative int, got -1"),
    (dict(step=True), TypeError, r"step must be a non-negative int, got True \(bool\)"),
    (dict(step="3"), TypeError, "step must be a non-negative int"),
    (dict(overwrite="yes"), TypeError, "overwrite must be True or False"),
    (dict(config={"rank": 2}), TypeError, "config must be a lorax.LoraConfig or None, got dict"),
])
def test_bad_save_arguments_change_nothing(tmp_path, kwargs, error, match):
    lorax.save(tmp_path, adapted(0))
    unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(1), **kwargs), error, match)


def test_numpy_step_and_numpy_config_scalars_are_plain_numbers(tmp_path):
    config = lorax.LoraConfig(rank=np.int64(2), alpha=np.float32(16))
    folder = lorax.save(tmp_path, adapted(0), step=np.int64(4), config=config)
    record = json.loads((folder / "meta" / "metadata").read_text())
    assert (folder.name, record["config"]["rank"], record["config"]["alpha"]) == ("4", 2, 16.0)


def test_interrupted_overwrite_leaves_the_old_step(tmp_path, monkeypatch):
    lorax.save(tmp_path, adapted(0))

    def crash(new, target):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint, "swap_in", crash)
    unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(1), step=0, overwrite=True), OSError, "disk gone")
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE)), b_of(adapted(0)))


def test_orbax_declining_to_save_raises(tmp_path, monkeypatch):
    lorax.save(tmp_path, adapted(0))
    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", lambda self, *a, **k: False)
    unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(1)), RuntimeError, "orbax skipped step 1")


def test_second_writer_gets_a_clear_error(tmp_path):
    lorax.save(tmp_path, adapted(0))
    with lock_held_by_another_process(tmp_path):
        unchanged(tmp_path, lambda: lorax.save(tmp_path, adapted(1)), RuntimeError,
                  "another process is saving to .*one writer per folder")


def test_load_of_a_missing_folder_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lorax.load(tmp_path / "nope", BASE)
    assert not (tmp_path / "nope").exists()
    lorax.save(tmp_path, adapted(0))
    unchanged(tmp_path, lambda: lorax.load(tmp_path, BASE, step=3), ValueError, r"no step 3 in .*its steps are \[0\]")


def test_colliding_slash_keys_are_refused_naming_both(tmp_path):
    tree = {"a/b": lorax.Trainable(jnp.ones(2)), "a": {"b": lorax.Trainable(jnp.zeros(2))}}
    unchanged(tmp_path, lambda: lorax.save(tmp_path, tree), ValueError,
              r"lorax.save: the leaves \['a'\]\['b'\] and \['a/b'\] are both named 'a/b'")
    plain = {"a/b": jnp.ones((3, 3)), "a": {"b": jnp.ones((3, 3))}}
    with pytest.raises(ValueError, match="lorax.init: the leaves .* are both named 'a/b'"):
        lorax.init(jax.random.key(0), lorax.LoraConfig(rank=1), lambda p, x: x @ p["a/b"], plain, jnp.ones((1, 3)))


def test_abstract_or_mismatched_nodes_are_refused(tmp_path):
    lp = adapted(0)
    abstract = jax.eval_shape(lambda: lp)
    unchanged(tmp_path, lambda: lorax.save(tmp_path, abstract), TypeError,
              r"'q_proj/kernel' holds ShapeDtypeStruct, not a concrete array")
    k = lp["q_proj"]["kernel"]
    bad = {**lp, "q_proj": {"kernel": lorax.LoraWeight(k.w, k.a, jnp.zeros((3, 5)), a_axes=(0,), b_axes=(1,))}}
    unchanged(tmp_path, lambda: lorax.save(tmp_path, bad), ValueError,
              r"LoraWeight at 'q_proj/kernel': factors do not fit w \(6, 5\)")
    nan = {**lp, "q_proj": {"kernel": lorax.LoraWeight(k.w, k.a, k.b, scale=math.nan)}}
    unchanged(tmp_path, lambda: lorax.save(tmp_path, nan), ValueError,
              "the scale of 'q_proj/kernel' must be a finite number, got nan")


@pytest.mark.parametrize("call, error, match", [
    (lambda d: lorax.load(d, BASE, step="1"), TypeError, r"lorax.load: step must be a non-negative int, got '1'"),
    (lambda d: lorax.load(d, BASE, step=-2), ValueError, "lorax.load: step must be a non-negative int, got -2"),
    (lambda d: lorax.load(d / "0" / "_CHECKPOINT_METADATA", BASE), ValueError, "is a file, not a folder"),
    (lambda d: lorax.load(7, BASE), TypeError, "directory must be a str or os.PathLike, got int"),
    (lambda d: lorax.load(d, {"q_proj": {"kernel": 1.0}, "v_proj": BASE["v_proj"]}), ValueError,
     r"q_proj/kernel: the base holds float, not an array"),
    (lambda d: lorax.save(d, {"w": jnp.ones(3)}), ValueError, "params hold no LoraWeight or Trainable leaf"),
])
def test_bad_load_and_save_calls_change_nothing(tmp_path, call, error, match):
    lorax.save(tmp_path, adapted(0))
    unchanged(tmp_path, lambda: call(tmp_path), error, match)


def _damage(folder: Path, change) -> Path:
    meta = folder / "meta" / "metadata"
    record = json.loads(meta.read_text())
    change(record)
    meta.write_text(json.dumps(record))
    return meta


@pytest.mark.parametrize("change, field", [
    (lambda r: r["weights"][0].update(scale="2.0"), r"weights\[0\].scale must be a finite number"),
    (lambda r: r.update(format=2), r"'format' must be 1"),
    (lambda r: r.update(format="1"), r"'format' must be 1"),
    (lambda r: r.update(weights=[]), r"'weights' must be a non-empty list"),
    (lambda r: r.pop("weights"), r"'weights' must be a non-empty list"),
    (lambda r: r["weights"][1].update(rank=0), r"weights\[1\].rank must be an int >= 1"),
    (lambda r: r["weights"][0].update(kind="boft"),
     r"weights\[0\].kind must be one of \['dora', 'ia3', 'loha', 'lokr', 'lora', 'lora_bank', 'oft', 'trainable', "
     r"'vera'\]"),
    (lambda r: r["weights"][0].update(kind="vera"), r"weights\[0\].shared must be the index in 'shared' of each of"),
    (lambda r: r.update(shared=[{"shape": [2]}]), r"'shared' must be a list of \{'shape', 'dtype'\} objects"),
    (lambda r: r["weights"][0].update(shape=[6, -5]), r"weights\[0\].shape must be a list of ints >= 0"),
    (lambda r: r["weights"][0].update(dtype="float99"), r"weights\[0\].dtype must be a dtype name"),
    (lambda r: r["weights"][0].update(a_axes=[1]), r"weights\[0\].a_axes/b_axes/stack_axes must be lists"),
    (lambda r: r["weights"][0].pop("dropout"), r"weights\[0\].dropout must be a finite number in \[0, 1\)"),
    (lambda r: r["weights"].append(r["weights"][0]), r"weights\[2\].path must be a string naming one leaf once"),
    (lambda r: r.update(config=[1]), r"'config' must be an object or null"),
])
def test_damaged_metadata_is_refused_naming_file_and_field(tmp_path, change, field):
    meta = _damage(lorax.save(tmp_path, adapted(0)), change)
    unchanged(tmp_path, lambda: lorax.load(tmp_path, BASE), ValueError, f"{meta}: {field}")


def test_missing_items_are_named(tmp_path):
    folder = lorax.save(tmp_path, adapted(0))
    (folder / "meta" / "metadata").write_text("{not json")
    unchanged(tmp_path, lambda: lorax.load(tmp_path, BASE), ValueError,
              r"meta/metadata' is missing or unreadable; step 0 is not a complete lorax checkpoint")
    folder = lorax.save(tmp_path, adapted(0))
    shutil.rmtree(folder / "adapters")
    unchanged(tmp_path, lambda: lorax.load(tmp_path, BASE), ValueError,
              "the arrays of step 1 in .* are missing or damaged")


SLOW = settings(max_examples=examples(12), deadline=None, suppress_health_check=list(HealthCheck))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=3),
                    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
                    max_leaves=4)


@SLOW
@given(entry=st.integers(0, 1), key=st.sampled_from(["path", "kind", "shape", "dtype", "rank", "scale", "a_axes",
                                                      "b_axes", "stack_axes", "dropout", "factor_dtype"]),
       value=JSON)
def test_random_metadata_damage_is_a_value_error_or_a_faithful_load(tmp_path_factory, entry, key, value):
    root = tmp_path_factory.mktemp("ckpt")
    meta = _damage(lorax.save(root, adapted(0)), lambda r: r["weights"][entry].__setitem__(key, value))
    try:
        back = lorax.load(root, BASE)
    except ValueError as err:
        assert str(meta) in str(err) or "does not fit this base" in str(err) or "arrays of step" in str(err), err
    else:  # the damage happened to leave a valid record: the load follows it
        node = jax.tree.leaves(back, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))[entry]
        assert isinstance(node, lorax.LoraWeight) and (key != "scale" or node.scale == value)


@SLOW
@given(cut=st.floats(0.0, 0.95))
def test_truncated_metadata_is_a_value_error(tmp_path_factory, cut):
    root = tmp_path_factory.mktemp("ckpt")
    meta = lorax.save(root, adapted(0)) / "meta" / "metadata"
    data = meta.read_bytes()
    meta.write_bytes(data[: int(cut * len(data))])
    unchanged(root, lambda: lorax.load(root, BASE), ValueError, "missing or unreadable|must be")


KEYS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=6)


@SLOW
@given(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True), data=st.data())
def test_random_trees_with_odd_keys_round_trip_exactly(tmp_path_factory, keys, data):
    rng = np.random.default_rng(len(keys))
    tree, base = {}, {}
    for k in keys:
        n, m, r = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), 1
        w = jnp.asarray(rng.normal(size=(n, m)), jnp.float32)
        tree[k] = lorax.LoraWeight(w, jnp.asarray(rng.normal(size=(n, r)), jnp.float32),
                                   jnp.asarray(rng.normal(size=(r, m)), jnp.float32), scale=float(n))
        base[k] = w
    root = tmp_path_factory.mktemp("ckpt")
    lorax.save(root, {"outer": tree})
    back = lorax.load(root, {"outer": base})["outer"]
    for k in keys:
        np.testing.assert_array_equal(back[k].a, tree[k].a)
        np.testing.assert_array_equal(back[k].b, tree[k].b)
        assert back[k].scale == tree[k].scale


def test_state_template_mismatch_and_missing_state_are_clear_errors(tmp_path):
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    base = {"w": jnp.ones((4, 3))}
    lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    lorax.save(tmp_path, lp)
    with pytest.raises(ValueError, match="holds no training state"):
        lorax.load(tmp_path, base, state={"step": 0})
    lorax.save(tmp_path, lp, state={"step": 3, "m": jnp.zeros(2)})
    with pytest.raises(ValueError, match="does not match the template given"):
        lorax.load(tmp_path, base, state={"step": 0, "m": jnp.zeros(5)})
    with pytest.raises(TypeError, match=r"state\['key'\] is a typed PRNG key; pass jax.random.key_data"):
        lorax.save(tmp_path, lp, state={"key": jax.random.key(0)})
    with pytest.raises(TypeError, match=r"state\['name'\] is str"):
        lorax.save(tmp_path, lp, state={"name": "run"})
