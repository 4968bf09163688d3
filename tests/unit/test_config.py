"""`lorax.LoraConfig`: every wrong type and value refused, naming the field; NumPy scalars taken as
numbers; rank and alpha patterns, rsLoRA, predicate targets, exclude and trainable."""

import json
import math

import jax
import numpy as np
import pytest
from helpers import KEY, make_case

import lorax


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
    (dict(rank=0), ValueError, "rank for 'rank' must be a positive int, got 0"),
    (dict(rank=2.5), TypeError, "must be a positive int, got 2.5"),
    (dict(alpha=0.0), ValueError, "alpha for 'alpha' must be > 0"),
    (dict(alpha_pattern={"x": -1.0}), ValueError, "alpha for 'x' must be > 0"),
    (dict(targets="(unclosed"), ValueError, r"LoraConfig.targets: '\(unclosed' is not a valid regex"),
    (dict(exclude=["[bad"]), ValueError, "LoraConfig.exclude"),
    (dict(dropout=1.0), ValueError, "dropout must be in"),
    (dict(init="zeros"), ValueError, "init must be"),
    (dict(use_dora="yes"), TypeError, "use_dora must be True or False"),
    (dict(kind="boft"), ValueError,
     r"kind must be one of \['dora', 'ia3', 'loha', 'lokr', 'lora', 'oft', 'vera'\] .*got 'boft'"),
    (dict(kind="lora_bank"), ValueError, "kind must be one of"),  # banks are built by lorax.adapters.bank
    (dict(kind=1), TypeError, "kind must be None or a kind's name, one of .* got 1"),
    (dict(kind="lora", use_dora=True), ValueError, "use_dora=True asks for DoRA but kind='lora'"),
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


def test_rank_alpha_patterns_and_rslora():
    fn, params, x = make_case("mlp")
    config = lorax.LoraConfig(rank=4, alpha=8.0, rank_pattern={r".*Dense_1/kernel": 2},
                              alpha_pattern={r".*Dense_2/kernel": 1.0}, use_rslora=True)
    lp = lorax.init(KEY, config, fn, params, x)["params"]
    assert [lp[f"Dense_{i}"]["kernel"].rank for i in range(3)] == [4, 2, 4]
    assert [lp[f"Dense_{i}"]["kernel"].scale for i in range(3)] == pytest.approx(
        [8 / 2, 8 / np.sqrt(2), 1 / 2])


def test_predicate_targets_exclude_and_trainable():
    fn, params, x = make_case("mlp")
    config = lorax.LoraConfig(rank=2, targets=lambda path, leaf: leaf.ndim == 2,
                              exclude=r".*Dense_0/.*", trainable=r".*/bias")
    lp = lorax.init(KEY, config, fn, params, x)["params"]
    assert not isinstance(lp["Dense_0"]["kernel"], lorax.LoraWeight)
    assert isinstance(lp["Dense_1"]["kernel"], lorax.LoraWeight)
    assert isinstance(lp["Dense_0"]["bias"], lorax.Trainable)


def test_kind_selects_the_adapter_kind_and_use_dora_stays_its_alias():
    fn, params, x = make_case("mlp")
    for config in (lorax.LoraConfig(rank=2, kind="dora"), lorax.LoraConfig(rank=2, use_dora=True)):
        assert (config.adapter_kind, config.record()["kind"]) == ("dora", "dora")
        nodes = jax.tree.leaves(lorax.init(KEY, config, fn, params, x), is_leaf=lambda n: isinstance(n, lorax.Adapter))
        assert {type(n) for n in nodes if isinstance(n, lorax.Adapter)} == {lorax.DoraWeight}
    assert lorax.LoraConfig().adapter_kind == "lora"


def test_replace_changes_the_kind_either_way():
    """The fields stay as given, so ``dataclasses.replace`` toggles DoRA as PEFT-style code does."""
    import dataclasses

    assert dataclasses.replace(lorax.LoraConfig(use_dora=True), use_dora=False).adapter_kind == "lora"
    assert dataclasses.replace(lorax.LoraConfig(), use_dora=True).adapter_kind == "dora"
    assert dataclasses.replace(lorax.LoraConfig(kind="dora"), kind="lora").adapter_kind == "lora"


def test_register_kind_refuses_a_taken_name_and_a_kind_without_create_is_not_selectable():
    import dataclasses

    from lorax import extend

    with pytest.raises(ValueError, match="the kind 'lora' is LoraWeight's already"):
        @extend.register_kind
        @dataclasses.dataclass(frozen=True, repr=False)
        class Impostor(lorax.LoraWeight):
            kind = "lora"

    assert extend.KINDS["lora"] is lorax.LoraWeight

    @extend.register_kind
    @dataclasses.dataclass(frozen=True, repr=False)
    class NoCreate(extend.Adapter):
        kind = "no-create-test"

    try:
        with pytest.raises(ValueError, match="implements create.*got 'no-create-test'"):
            lorax.LoraConfig(kind="no-create-test")
    finally:
        del extend.KINDS["no-create-test"]


def test_a_kind_registered_through_lorax_extend_is_selected_by_name(tmp_path):
    """A kind outside lorax, with its own ``create``, is one ``LoraConfig(kind=...)`` away, and
    checkpoints save and load it with no code of its own."""
    import dataclasses

    from lorax import extend

    @extend.register_kind
    @dataclasses.dataclass(frozen=True, repr=False)
    class Halved(lorax.LoraWeight):
        kind = "halved-test"

        def merged(self):
            return self.w + 0.5 * self.scale * self.a @ self.b

    @extend.apply("dot_general", adapter=Halved)
    def halved_dot(eqn, invals, ctx):
        parts = extend.dot_parts(eqn, invals, ctx)
        return None if parts is None else [parts.base + 0.5 * parts.update]

    try:
        fn, params, x = make_case("mlp")
        lp = lorax.init(KEY, lorax.LoraConfig(rank=2, kind="halved-test"), fn, params, x)
        node = lp["params"]["Dense_0"]["kernel"]
        assert type(node) is Halved
        lp = jax.tree.map(lambda n: n.replace(b=n.b + 0.1) if isinstance(n, Halved) else n, lp,
                          is_leaf=lambda n: isinstance(n, Halved))
        np.testing.assert_allclose(lorax.lora(fn)(lp, x), fn(lorax.merge(lp), x), rtol=1e-5, atol=1e-5)
        lorax.save(tmp_path, lp)
        back = lorax.load(tmp_path, params)
        assert type(back["params"]["Dense_0"]["kernel"]) is Halved
        np.testing.assert_array_equal(back["params"]["Dense_0"]["kernel"].b, lp["params"]["Dense_0"]["kernel"].b)
    finally:
        del extend.KINDS["halved-test"], extend.RULES["dot_general"].apply[Halved]
