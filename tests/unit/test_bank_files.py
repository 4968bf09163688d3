"""Bank writes and names: a save of several adapters completes or leaves the folder as it was;
every entry point checks adapter names alike; adapters over a residual base are refused."""

import hashlib
import os

import jax
import numpy as np
import pytest
from helpers import BANK_BASE as BASE
from helpers import BANK_X as X
from helpers import bank_fn as FN
from helpers import bank_member as one

import lorax
import lorax._src.io.checkpoint
import lorax._src.io.files
import lorax.peft
from lorax import adapters

MAPPING = [(r"(?P<m>q_proj|v_proj)/kernel", "{m}")]


@pytest.fixture(scope="module")
def bank():
    return adapters.bank({"code": one(1), "math": one(2, rank=3)})


def tree_hash(folder):
    """Names, modes and contents of everything under ``folder`` (and its parent's listing)."""
    digest = hashlib.sha256(repr(sorted(os.listdir(os.path.dirname(folder)))).encode())
    for top, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files) + dirs:
            path = os.path.join(top, name)
            digest.update(f"{os.path.relpath(path, folder)} {oct(os.lstat(path).st_mode)}".encode())
            if name in files:
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def merged(params):
    return lorax.merge(params)["q_proj"]["kernel"]


def test_save_refused_for_one_adapter_writes_none(bank, tmp_path):
    adapters.save(tmp_path / "bank", bank, step=1)
    lorax.save(tmp_path / "bank" / "math", adapters.select(bank, "math"), step=3)  # math is ahead
    before = tree_hash(tmp_path / "bank")
    changed = adapters.bank({"code": one(7), "math": one(8, rank=3)})
    with pytest.raises(ValueError, match=r"step 2 is lower than the latest step 3 in '.*/bank/math'"):
        adapters.save(tmp_path / "bank", changed, step=2)
    assert tree_hash(tmp_path / "bank") == before
    back = adapters.load(tmp_path / "bank", BASE)  # latest steps: code 1, math 3, both the old adapters
    for name in ("code", "math"):
        np.testing.assert_allclose(merged(adapters.select(back, name)), merged(adapters.select(bank, name)), rtol=1e-6)


def test_save_completes_every_adapter_and_keeps_other_folders(bank, tmp_path):
    (tmp_path / "bank" / "notes").mkdir(parents=True)
    (tmp_path / "bank" / "notes" / "readme.txt").write_text("kept")
    adapters.save(tmp_path / "bank", bank)
    changed = adapters.bank({"code": one(7), "math": one(8, rank=3)})
    steps = adapters.save(tmp_path / "bank", changed)
    assert {n: p.name for n, p in steps.items()} == {"code": "1", "math": "1"}
    assert all(p.is_dir() and p.parent.parent == tmp_path / "bank" for p in steps.values())
    assert (tmp_path / "bank" / "notes" / "readme.txt").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["bank"]  # no staging left beside it
    back = adapters.load(tmp_path / "bank", BASE, only=["code", "math"])
    for name in ("code", "math"):
        np.testing.assert_allclose(merged(adapters.select(back, name)), merged(adapters.select(changed, name)),
                                   rtol=1e-6)


def test_a_failed_write_of_the_last_adapter_leaves_the_folder(bank, tmp_path, monkeypatch):
    adapters.save(tmp_path / "bank", bank)
    before = tree_hash(tmp_path / "bank")
    real_save = lorax._src.io.checkpoint.save

    def fails_on_math(directory, params, **kwargs):
        if directory.name == "math":
            raise OSError("No space left on device")
        return real_save(directory, params, **kwargs)

    monkeypatch.setattr(lorax._src.io.checkpoint, "save", fails_on_math)
    with pytest.raises(OSError, match="No space left"):
        adapters.save(tmp_path / "bank", adapters.bank({"code": one(7), "math": one(8)}))
    assert tree_hash(tmp_path / "bank") == before and sorted(os.listdir(tmp_path)) == ["bank"]


def test_refused_save_into_a_new_folder_creates_nothing(bank, tmp_path):
    with pytest.raises(TypeError, match="lorax.save: overwrite must be True or False"):
        adapters.save(tmp_path / "new" / "bank", bank, overwrite="yes")
    assert os.listdir(tmp_path) == []


def test_a_second_writer_is_refused(bank, tmp_path):
    adapters.save(tmp_path / "bank", bank)
    before = tree_hash(tmp_path / "bank")
    with lorax._src.io.files.staged_folder(tmp_path / "bank", "another writer"):  # holds the folder, writes nothing
        with pytest.raises(RuntimeError, match="another process is saving to '.*/bank'"):
            adapters.save(tmp_path / "bank", adapters.bank({"code": one(7), "math": one(8)}))
        with pytest.raises(RuntimeError, match="another process is saving"):
            adapters.save_peft(tmp_path / "bank", bank, MAPPING)
    assert tree_hash(tmp_path / "bank") == before


def test_save_refuses_a_file_where_an_adapter_folder_goes(bank, tmp_path):
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "math").write_text("not a folder")
    before = tree_hash(tmp_path / "bank")
    with pytest.raises(ValueError, match=r"'.*/bank/math' is a file; adapter 'math' needs a folder there"):
        adapters.save(tmp_path / "bank", bank)
    assert tree_hash(tmp_path / "bank") == before


def test_save_peft_refused_for_one_adapter_writes_none(tmp_path):
    first = adapters.bank({"default": one(1), "terse": one(2)})
    adapters.save_peft(tmp_path / "export", first, MAPPING)
    before = tree_hash(tmp_path / "export")
    negative = jax.tree.map(lambda x: x.replace(scale=-1.0) if isinstance(x, lorax.LoraWeight) else x, one(4),
                            is_leaf=lambda x: isinstance(x, lorax.LoraWeight))
    refused = adapters.bank({"default": one(3), "terse": negative})  # default is written first, then terse refused
    with pytest.raises(ValueError, match=r"lora_alpha \(scale x rank\) of 'q_proj/kernel' must be > 0, got -2.0"):
        adapters.save_peft(tmp_path / "export", refused, MAPPING)
    assert tree_hash(tmp_path / "export") == before
    with pytest.raises(ValueError, match="the mapping gives 'q_proj/kernel' and 'v_proj/kernel' one torch name"):
        adapters.save_peft(tmp_path / "export", first, [(r".*/kernel", "q_proj")])
    assert tree_hash(tmp_path / "export") == before
    back = adapters.load_peft(tmp_path / "export", FN, BASE, X, mapping=MAPPING)
    for name in ("default", "terse"):
        np.testing.assert_allclose(merged(adapters.select(back, name)), merged(adapters.select(first, name)),
                                   rtol=1e-6)


def test_save_peft_replaces_every_adapter(tmp_path):
    adapters.save_peft(tmp_path / "export", adapters.bank({"default": one(1), "terse": one(2)}), MAPPING)
    second = adapters.bank({"default": one(3), "terse": one(4, rank=3)})
    folders = adapters.save_peft(tmp_path / "export", second, MAPPING)
    assert folders == {"default": tmp_path / "export", "terse": tmp_path / "export" / "terse"}
    back = adapters.load_peft(tmp_path / "export", FN, BASE, X, mapping=MAPPING)
    for name in ("default", "terse"):
        np.testing.assert_allclose(merged(adapters.select(back, name)), merged(adapters.select(second, name)),
                                   rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["export"]


BAD_NAMES = ["../escape", "a/b", ".hidden", "", "..", 5, None]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_every_entry_point_checks_adapter_names_alike(bank, bad):
    calls = [
        ("bank", lambda: adapters.bank({"code": one(1), bad: one(2)})),
        ("add", lambda: adapters.add(bank, bad, one(3))),
        ("rename", lambda: adapters.rename(bank, "code", bad)),
        ("rename", lambda: adapters.rename(bank, bad, "other")),
        ("weighted", lambda: adapters.weighted(bank, bad, ["code"], [1.0], how="cat")),
        ("weighted", lambda: adapters.weighted(bank, "mix", [bad], [1.0], how="cat")),
        ("select", lambda: adapters.select(bank, [bad])),
        ("delete", lambda: adapters.delete(bank, bad)),
    ]
    if bad is not None:  # None is the base alone for index_of and route
        calls += [("index_of", lambda: adapters.index_of(bank, [bad, None])),
                  ("index_of", lambda: adapters.route(bank, [bad, "code"]))]
    for who, call in calls:
        with pytest.raises(ValueError, match=rf"lorax.adapters.{who}: adapter name .* must be a non-empty string of "
                                             "letters, digits"):
            call()


@pytest.mark.parametrize("bad", ["../escape", ".hidden", 3])
def test_load_checks_the_names_in_only(bank, tmp_path, bad):
    adapters.save(tmp_path / "bank", bank)
    adapters.save_peft(tmp_path / "peft", bank, MAPPING)
    with pytest.raises(ValueError, match=r"lorax.adapters.load: adapter name .* must be a non-empty string"):
        adapters.load(tmp_path / "bank", BASE, only=["code", bad])
    with pytest.raises(ValueError, match=r"lorax.adapters.load_peft: adapter name .* must be a non-empty string"):
        adapters.load_peft(tmp_path / "peft", FN, BASE, X, mapping=MAPPING, only=[bad])


def test_load_only_must_be_a_list_of_distinct_names(bank, tmp_path):
    adapters.save(tmp_path / "bank", bank)
    with pytest.raises(TypeError, match=r"only must be a list of adapter names, got 'code' \(str\)"):
        adapters.load(tmp_path / "bank", BASE, only="code")
    with pytest.raises(ValueError, match=r"only names an adapter twice: \['code', 'code'\]"):
        adapters.load(tmp_path / "bank", BASE, only=["code", "code"])


def test_writers_refuse_a_bank_holding_a_bad_name(bank, tmp_path):
    """A bank whose names were changed behind the API's back: the writers check again."""
    escaped = jax.tree.map(lambda x: x.replace(names=("../escape", "math")) if isinstance(x, lorax.LoraBank) else x,
                           bank, is_leaf=lambda x: isinstance(x, lorax.LoraBank))
    for save, args in ((adapters.save, ()), (adapters.save_peft, (MAPPING,))):
        with pytest.raises(ValueError, match=r"adapter name '\.\./escape' must be a non-empty string"):
            save(tmp_path / "bank", escaped, *args)
    assert os.listdir(tmp_path) == []


def test_select_and_index_of_refuse_other_types(bank):
    with pytest.raises(TypeError, match=r"lorax.adapters.select: which must be an adapter name or a sequence of "
                                        r"names, got 3 \(int\)"):
        adapters.select(bank, 3)
    with pytest.raises(TypeError, match=r"lorax.adapters.index_of: which must be .* got 3 \(int\)"):
        adapters.index_of(bank, 3)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_inits_are_refused_by_bank_and_add(bank, init):
    message = f"'q_proj/kernel' was initialised with {init}, so its frozen w is a residual, not the base"
    with pytest.raises(ValueError, match=f"lorax.adapters.bank: {message}"):
        adapters.bank({"pissa": one(3, init=init)})
    with pytest.raises(ValueError, match=f"lorax.adapters.add: {message}"):
        adapters.add(bank, "pissa", one(3, init=init))


def test_a_plain_adapter_on_the_base_still_adds_after_a_refused_residual_one(bank):
    with pytest.raises(ValueError, match="residual"):
        adapters.bank({"niter": one(3, init="pissa_niter_4"), "plain": one(4)})
    grown = adapters.add(bank, "plain", one(4))
    assert adapters.names(grown) == ("code", "math", "plain")
    np.testing.assert_allclose(merged(adapters.select(grown, "plain")), merged(one(4)), rtol=1e-6)
