"""Every entry point against bad input, damaged files, interrupted and concurrent writes.

Each case asserts the exception type, a message naming the problem, and that nothing on
disk changed."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lock_held_by_another_process, subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import lorax
import lorax.peft
from lorax._src import checkpoint, peft_config
from lorax._src import peft as peft_impl

ROOT = Path(__file__).resolve().parents[1]
MAPPING = [(r"(?P<m>q|v)_proj/kernel", "layer.{m}_proj")]
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


def fn(p, x):
    return (x @ p["q_proj"]["kernel"]) @ p["v_proj"]["kernel"]


BASE = {"q_proj": {"kernel": jnp.ones((6, 5))}, "v_proj": {"kernel": jnp.full((5, 4), 0.5)}}
X = jnp.ones((2, 6))


def adapted(seed=0, **config):
    lp = lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2, **config), fn, BASE, X)
    return jax.tree.map(lambda n: _random_b(n, seed), lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))


def _random_b(node, seed):
    if not isinstance(node, lorax.LoraWeight):
        return node
    b = jax.random.normal(jax.random.key(seed + 1), node.b.shape)
    return lorax.LoraWeight(node.w, node.a, b, scale=node.scale, a_axes=node.a_axes, b_axes=node.b_axes)


def b_of(tree):
    return np.asarray(tree["q_proj"]["kernel"].b)


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with a hash of each file's bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def unchanged(root: Path, call, error, match):
    before = snapshot(root)
    with pytest.raises(error, match=match):
        call()
    assert snapshot(root) == before


# ---------------------------------------------------------------------------- steps and data loss


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


def test_two_processes_saving_at_once_never_leave_a_broken_step(tmp_path):
    script = textwrap.dedent(f"""
        from test_adversarial import adapted, lorax
        ok = 0
        for i in range(3):
            try:
                lorax.save({str(tmp_path)!r}, adapted(i))
                ok += 1
            except RuntimeError as err:
                assert "another process is saving" in str(err), err
        print(ok)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=subprocess_env()) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    steps = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert len(steps) == sum(int(out) for out, _ in outs) >= 1
    for step in steps:
        lorax.load(tmp_path, BASE, step=step)  # every step is complete


def test_save_into_a_regular_file_fails_fast_and_exits(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    script = textwrap.dedent(f"""
        from test_adversarial import adapted, lorax
        try:
            lorax.save({str(target)!r}, adapted(0))
        except ValueError as err:
            print(err)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0 and "is a file, not a folder" in proc.stdout, proc.stderr[-2000:]
    assert target.read_text() == "not a folder"


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


# ---------------------------------------------------------------------------- damaged checkpoints


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
    (lambda r: r["weights"][0].update(kind="vera"),
     r"weights\[0\].kind must be one of \['dora', 'lora', 'lora_bank', 'trainable'\]"),
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


# ---------------------------------------------------------------------------- config and init


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=math.inf), ValueError, "alpha for 'alpha' must be a finite number, got inf"),
    (dict(alpha=math.nan), ValueError, "must be a finite number, got nan"),
    (dict(alpha="16"), TypeError, r"alpha for 'alpha' must be a number, got '16' \(str\)"),
    (dict(rank=True), TypeError, r"rank for 'rank' must be a positive int, got True \(bool\)"),
    (dict(rank_pattern={"x": 2.0}), TypeError, "rank for 'x' must be a positive int"),
    (dict(rank_pattern=[("x", 2)]), TypeError, r"rank_pattern must be a mapping \{regex: value\}"),
    (dict(alpha_pattern={"(": 2.0}), ValueError, r"LoraConfig.alpha_pattern: '\(' is not a valid regex"),
    (dict(targets=5), TypeError, r"LoraConfig.targets: expected a regex string .* got 5"),
    (dict(targets=["ok", 3]), TypeError, r"LoraConfig.targets: expected .* got \['ok', 3\]"),
    (dict(exclude=7), TypeError, "LoraConfig.exclude: expected a regex string"),
    (dict(dropout=math.nan), ValueError, "dropout must be a finite number"),
    (dict(dropout="0.1"), TypeError, "dropout must be a number"),
    (dict(use_rslora="yes"), TypeError, "use_rslora must be True or False"),
    (dict(dtype="float99"), TypeError, "dtype must be None or a dtype"),
])
def test_config_refuses_wrong_types_and_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        lorax.LoraConfig(**kwargs)


def test_config_takes_numpy_scalars_as_numbers():
    config = lorax.LoraConfig(rank=np.int64(4), alpha=np.float32(8), rank_pattern={"x": np.int32(2)},
                              dropout=np.float64(0.1), use_rslora=np.bool_(False))
    scale = config.resolve("y", None, linear=True).scale
    assert (type(config.rank), config.rank_pattern["x"], scale, config.dropout) == (int, 2, 2.0, 0.1)
    assert json.dumps(config.record())  # JSON-able as written into checkpoints


def test_all_linear_skips_penzai_norm_and_int_weights_and_explain_says_so():
    def model(p, x):
        h = jnp.einsum("be,e->be", x, p["norm"]["scale"])  # penzai's RMSNorm
        h = h @ p["proj"]["kernel"] @ p["quant"]["kernel"].astype(jnp.float32)
        return h @ p["head"]

    params = {"norm": {"scale": jnp.ones(6)}, "proj": {"kernel": jnp.ones((6, 5))},
              "quant": {"kernel": jnp.ones((5, 5), jnp.int8)}, "head": jnp.ones(5)}
    lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=4), model, params, X)
    assert [type(lp[k]["kernel"] if k != "norm" else lp[k]["scale"]).__name__ for k in ("norm", "proj", "quant")] == \
        ["ArrayImpl", "LoraWeight", "ArrayImpl"]
    report = lorax.explain(model, lp, X)
    assert report.skipped == [("head", "its use leaves no output axis"),
                              ("norm/scale", "its use contracts no axis (an elementwise scale)"),
                              ("quant/kernel", "its dtype int8 is not floating")]
    assert "skipped quant/kernel: its dtype int8 is not floating" in str(report)
    with pytest.raises(ValueError, match=r"target 'quant/kernel' \(shape \(5, 5\)\) cannot take a low-rank "
                                         r"adapter: its dtype int8 is not floating"):
        lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2, targets="quant/kernel"), model, params, X)
    with pytest.raises(ValueError, match=r"target 'norm/scale' .* its use contracts no axis"):
        lorax.init(jax.random.key(0), lorax.LoraConfig(rank=1, targets="norm/.*"), model, params, X)


def test_init_refuses_a_config_that_is_not_a_lora_config():
    with pytest.raises(TypeError, match="config must be a lorax.LoraConfig, got dict"):
        lorax.init(jax.random.key(0), {"rank": 2}, fn, BASE, X)


# ---------------------------------------------------------------------------- PEFT folders


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


def test_swap_without_renameat2_falls_back_to_two_renames(tmp_path, monkeypatch):
    from lorax._src import files

    monkeypatch.setattr(files.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())  # no renameat2
    lorax.save(tmp_path, adapted(0))
    lorax.save(tmp_path, adapted(1), step=0, overwrite=True)
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE)), b_of(adapted(1)))
    assert {p.name for p in tmp_path.iterdir()} == {"0", ".lorax.lock"}


def test_save_peft_carries_other_files_and_folders_over(folder):
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a b c")
    lorax.peft.save_peft(folder, adapted(3), MAPPING)
    assert (folder / "tokenizer" / "vocab.txt").read_text() == "a b c"
    np.testing.assert_array_equal(b_of(load(folder)), b_of(adapted(3)))


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


def test_save_peft_refuses_a_scale_peft_cannot_express(tmp_path):
    lp = adapted(0)
    k = lp["q_proj"]["kernel"]
    lp["q_proj"]["kernel"] = lorax.LoraWeight(k.w, k.a, k.b, scale=-1.0)
    unchanged(tmp_path, lambda: lorax.peft.save_peft(tmp_path / "a", lp, MAPPING), ValueError,
              r"lora_alpha \(scale x rank\) of 'q_proj/kernel' must be > 0, got -2.0")
