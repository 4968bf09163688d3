"""IA³, LoHa, LoKr, OFT and VeRA (lorax/_src/kinds/ia3.py, loha.py, lokr.py, oft.py, vera.py) against the materialized
reference fn(merge(params)): outputs and gradients on dense, multi-axis einsum, scanned and bf16
models and a quantized base; factored on the compiled step; checkpoints, unmerge, bad options."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, assert_trees_close, make_case

import lorax
from lorax import extend
from lorax._src.kinds.lokr import split_dimension

KINDS = {
    "ia3": dict(kind="ia3"),
    "ia3-ff": dict(kind="ia3", options={"feedforward": [r"(.*/)?(proj|Dense_2|down)/kernel", "w3"]}),
    "loha": dict(kind="loha", rank=2, alpha=4.0),
    "lokr": dict(kind="lokr", rank=2, alpha=4.0),
    "lokr-both": dict(kind="lokr", rank=1, alpha=3.0, options={"decompose_both": True, "decompose_factor": 4}),
    "oft": dict(kind="oft", options={"block_size": 2}),
    "oft-exact-shared": dict(kind="oft", options={"block_size": 2, "block_share": True, "neumann_terms": 0}),
    "vera": dict(kind="vera", rank=4, options={"projection_key": 7}),
}
TOL = {"gpt-bf16": dict(rtol=5e-2, atol=5e-2)}


def perturbed(lp, seed=3):
    """Every trained array moved off its start (IA³ around 1), so every term is tested."""
    trainable, frozen = lorax.split(lp)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + (0.3 * jax.random.normal(k, x.shape)).astype(x.dtype) for k, x in zip(keys, leaves)]
    return lorax.combine(jax.tree.unflatten(treedef, moved), frozen)


def adapters(tree):
    return [n for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, lorax.Adapter))
            if isinstance(n, lorax.Adapter)]


CASES = [(kind, model) for kind in KINDS for model in ("mlp", "gpt")] + [
    (kind, model) for kind in ("ia3", "loha", "lokr", "oft") for model in ("gpt-bf16", "nnx")] + [("vera", "gpt-bf16")]


@pytest.mark.parametrize(("kind", "model"), CASES)
def test_outputs_and_gradients_match_the_merged_reference(kind, model):
    fn, params, x = make_case(model)
    lp = lorax.init(KEY, lorax.LoraConfig(**KINDS[kind]), fn, params, x)
    tol = TOL.get(model, dict(rtol=2e-4, atol=2e-5))
    start, frozen = lorax.split(lp)
    trainable = lorax.split(perturbed(lp))[0]

    def output_and_gradient(forward):  # one program per forward: its output and the loss's gradient
        def run(t):
            out, pull = jax.vjp(lambda t: forward(lorax.combine(t, frozen), x), t)
            return out, pull(2 * out)[0]  # d/dt of sum(out²)
        return jax.jit(run)

    ours, reference = (output_and_gradient(f) for f in (lorax.lora(fn), lambda p, x: fn(lorax.merge(p), x)))
    at_start, (base, _) = ours(start)[0], reference(start)  # merged at the start is the base itself
    assert_trees_close(at_start, base, **tol)  # the model starts unchanged
    (out, g), (ref, g_ref) = ours(trainable), reference(trainable)
    assert out.dtype == ref.dtype
    assert float(jnp.abs(out.astype(jnp.float32) - base.astype(jnp.float32)).max()) > 1e-2
    assert_trees_close(out, ref, **tol)
    assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g_ref)) > 1e-3
    if model == "gpt-bf16":
        # Both gradients are bf16 computations; elementwise they differ by bf16 noise (the reference
        # rounds W + ΔW to bf16), so each is measured against the same model computed in fp32: the
        # reference lands 1-7% from it (relative norm), lorax must land within 8% (a missing or
        # wrong term is off by order one).
        fp32_fn = make_case("gpt")[0]  # the same parameters, computed in fp32
        _, g_true = output_and_gradient(lambda p, x: fp32_fn(lorax.merge(p), x))(trainable)
        for got, true in zip(jax.tree.leaves(g), jax.tree.leaves(g_true)):
            assert float(jnp.linalg.norm(got - true) / jnp.linalg.norm(true)) <= 0.08
    else:
        assert_trees_close(g, g_ref, rtol=1e-3, atol=1e-5)
    lp = lorax.combine(trainable, frozen)
    report = lorax.explain(fn, lp, x)
    assert not report.materialized and {r.kind for r in report.rows} == {KINDS[kind]["kind"]}, str(report)


def test_ia3_scales_outputs_or_the_inputs_of_the_feedforward_weights():
    fn, params, x = make_case("mlp")
    lp = lorax.init(KEY, lorax.LoraConfig(**KINDS["ia3-ff"]), fn, params, x)
    nodes = lp["params"]
    assert [nodes[f"Dense_{i}"]["kernel"].on_input for i in range(3)] == [False, False, True]
    assert nodes["Dense_2"]["kernel"].vector.shape == (32,) and nodes["Dense_0"]["kernel"].vector.shape == (16,)
    assert all(bool((n.vector == 1).all()) for n in adapters(lp))
    assert lorax.explain(fn, lp, x).rows[0].rank == 0


@pytest.mark.parametrize("dims", [(576, -1), (128, -1), (127, -1), (128, 4), (128, 5), (12, -1), (64, 64)])
def test_lokr_splits_sizes_as_peft_does(dims):
    peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")
    assert split_dimension(*dims) == peft_lokr.factorization(*dims)


def test_lokr_blocks_follow_peft_rules_and_start_at_zero():
    w = {"w": jnp.ones((64, 96))}
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    x = jnp.ones((1, 64))
    small = lorax.init(KEY, lorax.LoraConfig(kind="lokr", rank=2), fn, w, x)["w"]
    assert (small.in_split, small.out_split, small.factored) == ((8, 8), (8, 12), (False, True))
    assert set(small.trained()) == {"k1", "k2_in", "k2_out"} and not small.k1.any()
    both = lorax.init(KEY, lorax.LoraConfig(kind="lokr", rank=2, options={"decompose_both": True}), fn, w, x)["w"]
    assert set(both.trained()) == {"k1_in", "k1_out", "k2_in", "k2_out"} and not both.k1_out.any()
    full = lorax.init(KEY, lorax.LoraConfig(kind="lokr", rank=8), fn, w, x)["w"]
    assert set(full.trained()) == {"k1", "k2"}
    assert full.num_adapter_params() == 8 * 8 + 8 * 12


@pytest.mark.parametrize("kind", ["ia3", "loha", "lokr", "oft", "vera"])
def test_quantized_base_matches_the_dequantized_model(kind):
    fn, params, x = make_case("mlp")
    quantized = lorax.quantize(params, "nf4", targets=r".*Dense_[01]/kernel", block=8)
    lp = perturbed(lorax.init(KEY, lorax.LoraConfig(**KINDS[kind]), fn, quantized, x))
    assert isinstance(lp["params"]["Dense_0"]["kernel"].w, lorax.QuantizedArray)
    assert_trees_close(jax.jit(lorax.lora(fn))(lp, x), jax.jit(fn)(lorax.merge(lp), x), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoint_round_trip_is_exact(kind, tmp_path):
    fn, params, x = make_case("gpt")
    config = lorax.LoraConfig(**KINDS[kind])
    lp = perturbed(lorax.init(KEY, config, fn, params, x))
    lorax.save(tmp_path, lp, config=config)
    back = lorax.load(tmp_path, params)
    assert jax.tree.structure(back) == jax.tree.structure(lp)
    for a, b in zip(adapters(lp), adapters(back)):
        assert type(a) is type(b) and a.meta == b.meta
        assert all(bool((a.trained()[n] == b.trained()[n]).all()) for n in a.trained())


@pytest.mark.parametrize("kind", ["ia3-ff", "loha", "lokr-both", "oft", "oft-exact-shared", "vera"])
def test_unmerge_recovers_the_base(kind):
    fn, params, x = make_case("mlp")
    lp = perturbed(lorax.init(KEY, lorax.LoraConfig(**KINDS[kind]), fn, params, x))
    trainable, _ = lorax.split(lp)
    held = lp if kind == "vera" else trainable  # VeRA's update needs the frozen half's shared projections
    back = lorax.unmerge(lorax.merge(lp), held)
    for path in ("Dense_0", "Dense_2"):
        np.testing.assert_allclose(back["params"][path]["kernel"].w, params["params"][path]["kernel"],
                                   rtol=1e-4, atol=1e-5)
    if kind == "vera":
        with pytest.raises(ValueError, match="Dense_0/kernel.* needs the shared projections"):
            lorax.unmerge(lorax.merge(lp), trainable)


def test_each_kind_is_factored_on_the_compiled_step():
    """No weight-sized temporary (the step through the materialized weight holds one), and about
    the flops of the frozen model's input gradient: the forward and the input's backward, no
    weight-sized gradient."""
    d_in, d_out, rows = 512, 768, 8
    w = {"w": jax.random.normal(KEY, (d_in, d_out)) / 20}
    fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    x = jax.random.normal(KEY, (rows, d_in))
    weight_bytes = d_in * d_out * 4
    frozen_flops = jax.jit(jax.grad(lambda x: jnp.sum(fn(w, x)))).lower(x).compile().cost_analysis()["flops"]
    for kind in KINDS:
        lp = perturbed(lorax.init(KEY, lorax.LoraConfig(**KINDS[kind]), fn, w, x))
        trainable, frozen = lorax.split(lp)

        def step(forward):
            return jax.jit(jax.grad(lambda t, f: jnp.sum(forward(lorax.combine(t, f), x))))

        lowered = step(lorax.lora(fn)).lower(trainable, frozen).compile()
        merged = step(lambda p, x: fn(lorax.merge(p), x)).lower(trainable, frozen).compile()
        temps = lowered.memory_analysis().temp_size_in_bytes
        assert temps < weight_bytes / 4, f"{kind}: {temps} bytes of temporaries"
        assert merged.memory_analysis().temp_size_in_bytes >= weight_bytes  # the measure can fail
        assert lowered.cost_analysis()["flops"] <= 1.15 * frozen_flops, kind


@pytest.mark.parametrize(("config", "error", "match"), [
    (dict(kind="ia3", options={"rank": 2}), ValueError, r"'ia3' takes the option 'feedforward', got \['rank'\]"),
    (dict(kind="ia3", options={"feedforward": 3}), TypeError, r"options\['feedforward'\] must be a regex"),
    (dict(kind="ia3", options={"feedforward": "(("}), ValueError, r"regex '\(\(' is not valid"),
    (dict(kind="lokr", options={"decompose_factor": 0}), ValueError, "must be -1 or a positive int, got 0"),
    (dict(kind="lokr", options={"decompose_both": "yes"}), TypeError, "must be True or False, got 'yes'"),
    (dict(kind="lokr", options={"factor": 2}), ValueError, r"takes the options .* got \['factor'\]"),
    (dict(kind="loha", options={"x": 1}), ValueError, r"the kind 'loha' takes no options, got \['x'\]"),
    (dict(options={"feedforward": "w"}), ValueError, r"the kind 'lora' takes no options"),
    (dict(kind="ia3", options=["feedforward"]), TypeError, "options must be a mapping"),
    (dict(kind="vera", options={"seed": 1}), ValueError, r"'vera' takes the options .* got \['seed'\]"),
    (dict(kind="vera", options={"projection_key": -1}), TypeError, r"'projection_key'\] must be an int >= 0"),
    (dict(kind="vera", options={"d_initial": "0.1"}), TypeError, r"'d_initial'\] must be a finite number"),
])
def test_bad_options_are_refused(config, error, match):
    with pytest.raises(error, match=match):
        lorax.LoraConfig(**config)


@pytest.mark.parametrize(("config", "match"), [
    (dict(kind="ia3", init="pissa"), r"'ia3' \('w'\) has its own initialisation .* init='pissa'"),
    (dict(kind="ia3", dropout=0.1), r"'ia3' \('w'\) .*no adapter dropout"),
    (dict(kind="loha", init="olora"), r"'loha' \('w'\) starts as PEFT's LoHa; got init='olora'"),
    (dict(kind="lokr", init="gaussian"), r"'lokr' \('w'\) starts as PEFT's LoKr; got init='gaussian'"),
    (dict(kind="vera", init="pissa"), r"'vera' \('w'\) has its own initialisation; got init='pissa'"),
])
def test_settings_a_kind_does_not_have_are_refused_at_init(config, match):
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(ValueError, match=match):
        lorax.init(KEY, lorax.LoraConfig(**config), fn, {"w": jnp.ones((8, 8))}, jnp.ones((1, 8)))


def test_uses_without_a_factored_rule_are_refused_at_init():
    fn, params, x = make_case("conv")
    with pytest.raises(ValueError, match=r"LohaWeight has no factored rule for .*conv_general_dilated"):
        lorax.init(KEY, lorax.LoraConfig(kind="loha", rank=2), fn, params, x)


def test_a_use_contracting_the_outputs_is_materialized_and_still_exact():
    """dot_matrices declines a product that contracts W's outputs (``y·Wᵀ``, as a tied head): that
    use is materialized, `explain` says so, and the result equals the reference."""
    def fn(p, x):
        return (x @ p["w"]) @ p["w"].T

    params, x = {"w": jax.random.normal(KEY, (6, 4))}, jax.random.normal(KEY, (2, 6))
    lp = perturbed(lorax.init(KEY, lorax.LoraConfig(kind="loha", rank=2), fn, params, x))
    assert_trees_close(lorax.lora(fn)(lp, x), fn(lorax.merge(lp), x), rtol=1e-4, atol=1e-5)
    explained = lorax.explain(fn, lp, x)
    assert explained.materialized == ["w"] and explained.rows[0].how == "materialized: dot_general", str(explained)


def test_hand_built_nodes_are_checked():
    with pytest.raises(ValueError, match=r"factors do not fit w \(4, 6\): got vector \(4,\)"):
        lorax.Ia3Weight(jnp.ones((4, 6)), jnp.ones(4)).check()
    lokr = lorax.LokrWeight(jnp.ones((4, 6)), k1=jnp.ones((2, 2)), k2=jnp.ones((2, 3)), in_split=(2, 2),
                            out_split=(2, 3), r=1, factored=(False, True))
    with pytest.raises(ValueError, match=r"got k1 \(2, 2\) and k2_in None and k2_out None"):
        lokr.check()


def test_kinds_import_nothing_but_the_extension_api():
    import ast
    from pathlib import Path

    for name in ("ia3", "loha", "lokr", "oft"):
        tree = ast.parse(Path(lorax.__file__).with_name("_src").joinpath("kinds", f"{name}.py").read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m for m in modules if m and m.startswith("lorax")} == {"lorax"}, (name, modules)
        assert extend.KINDS[name].peft is not None and dataclasses.is_dataclass(extend.KINDS[name])


@pytest.mark.parametrize("terms", [0, 1, 2, 3, 4, 5, 7])
def test_oft_blocks_are_peft_cayley_transforms(terms):
    """Each block is (I - S)(I + S)⁻¹ (terms 0), or PEFT's truncated series of it, term by term;
    exact blocks are orthogonal."""
    b = 4
    q = jax.random.normal(KEY, (3, b * (b - 1) // 2)) * 0.3
    node = lorax.OftWeight(jnp.ones((3 * b, 5)), q, block_size=b, neumann_terms=terms)
    rows, cols = np.triu_indices(b, 1)
    upper = np.zeros((3, b, b), np.float32)
    upper[:, rows, cols] = q
    s = upper - upper.transpose(0, 2, 1)
    eye = np.eye(b, dtype=np.float32)
    if terms == 0:
        want = (eye - s) @ np.linalg.inv(eye + s)
    else:  # peft.tuners.oft.layer.OFTRotationModule._cayley_batch, written out
        want = np.broadcast_to(eye, s.shape) + (2 * s if terms > 1 else 0)
        if terms > 2:
            powers = [np.linalg.matrix_power(s, k) for k in range(2, max(terms, 4))]
            want = want + sum(2 * p for p in powers[:max(terms - 3, 1)]) + powers[max(terms - 3, 1)]
    np.testing.assert_allclose(node.rotations(), want, rtol=1e-5, atol=1e-6)
    if terms == 0:
        np.testing.assert_allclose(np.swapaxes(want, -1, -2) @ want, np.broadcast_to(eye, want.shape), atol=1e-5)


def test_oft_refuses_a_block_size_that_does_not_divide_the_inputs():
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(ValueError, match=r"block_size 4 does not divide the 6 inputs of 'w' \(shape \(6, 3\)\)"):
        lorax.init(KEY, lorax.LoraConfig(kind="oft", options={"block_size": 4}), fn, {"w": jnp.ones((6, 3))},
                   jnp.ones((1, 6)))
    with pytest.raises(ValueError, match=r"needs options\['block_size'\], an int >= 2, got None"):
        lorax.LoraConfig(kind="oft")


def test_vera_nodes_share_one_projection_saved_once(tmp_path):
    """One A and one B for every weight, as wide as the widest (the scanned GPT's layers pass it whole),
    a checkpoint holds each once, and `load` gives every node the same array again."""
    fn, params, x = make_case("gpt")
    config = lorax.LoraConfig(**KINDS["vera"])
    lp = perturbed(lorax.init(KEY, config, fn, params, x))
    nodes = adapters(lp)
    widest = max(n.fans()[0] for n in nodes), max(n.fans()[1] for n in nodes)
    assert len(nodes) > 2 and any(n.stack_axes for n in nodes)
    assert all(n.vera_a is nodes[0].vera_a and n.vera_b is nodes[0].vera_b for n in nodes)
    assert nodes[0].vera_a.shape == (4, widest[0]) and nodes[0].vera_b.shape == (widest[1], 4)
    # PEFT's Kaiming-uniform bounds, and a seed that gives the same draw again
    assert float(jnp.abs(nodes[0].vera_a).max()) <= (6 / widest[0]) ** 0.5
    again = adapters(lorax.init(jax.random.key(9), config, fn, params, x))[0]
    assert bool((again.vera_a == nodes[0].vera_a).all()) and bool((again.vera_b == nodes[0].vera_b).all())
    lorax.save(tmp_path, lp, config=config)
    shared = sorted(p.name for p in (tmp_path / "0" / "shared").iterdir() if not p.name.startswith("_"))
    record = json.loads((tmp_path / "0" / "meta" / "metadata").read_text())
    assert [a["shape"] for a in record["shared"]] == [[4, widest[0]], [widest[1], 4]]
    assert {tuple(e["shared"].values()) for e in record["weights"]} == {(0, 1)}, shared
    back = adapters(lorax.load(tmp_path, params))
    assert all(n.vera_a is back[0].vera_a for n in back) and bool((back[0].vera_a == nodes[0].vera_a).all())
    assert_trees_close(lorax.merge(lorax.load(tmp_path, params)), lorax.merge(lp), rtol=0, atol=0)


def test_vera_refuses_weights_of_several_ranks_and_damaged_projections(tmp_path):
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match="share one projection, so one rank"):
        lorax.init(KEY, lorax.LoraConfig(kind="vera", rank=4, rank_pattern={".*Dense_0.*": 2}), fn, params, x)
    lp = lorax.init(KEY, lorax.LoraConfig(kind="vera", rank=4), fn, params, x)
    node = lp["params"]["Dense_0"]["kernel"]
    with pytest.raises(ValueError, match=r"'here': the shared projections \(4, 3\) .* expected \(4, >= \d+\)"):
        node.replace(vera_a=node.vera_a[:, :3]).check("here")
    lorax.save(tmp_path, lp)
    meta = tmp_path / "0" / "meta" / "metadata"
    record = json.loads(meta.read_text())
    record["weights"][0]["shared"] = {"vera_a": 0}
    meta.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"weights\[0\].shared must be the index in 'shared' of each of"):
        lorax.load(tmp_path, params)


def test_vera_dropout_drops_the_update_input_only():
    """``dropout`` (PEFT's ``vera_dropout``) drops the input of the update, not of the frozen product:
    with every input dropped the model is the base; without a key, no dropout."""
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    w, x = {"w": jax.random.normal(KEY, (8, 6))}, jnp.ones((4, 8))
    lp = perturbed(lorax.init(KEY, lorax.LoraConfig(kind="vera", rank=2, dropout=0.5), fn, w, x))
    assert lp["w"].dropout == 0.5
    merged = fn(lorax.merge(lp), x)
    assert_trees_close(lorax.lora(fn)(lp, x), merged, rtol=1e-5, atol=1e-6)
    dropped = lorax.lora(fn, rng=jax.random.key(1))({"w": lp["w"].replace(dropout=0.999999)}, x)
    assert_trees_close(dropped, fn(w, x), rtol=1e-5, atol=1e-5)
    some = lorax.lora(fn, rng=jax.random.key(1))(lp, x)
    assert not np.allclose(some, merged) and not np.allclose(some, fn(w, x))
