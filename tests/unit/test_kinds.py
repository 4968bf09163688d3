"""Adapter kinds and initialisations against the materialized reference fn(merge(params)):
DoRA, PiSSA, OLoRA; LoRA+ in the optimizer; the adapter contract's generic parts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import KEY, assert_trees_close, make_case, with_random_b
from lorax_examples import gpt

import lorax

MODELS = ["mlp", "gpt", "gpt-bf16", "nnx", "plain"]  # gpt: multi-axis DenseGeneral, nn.scan over nn.remat
TOL = {"gpt-bf16": dict(rtol=5e-2, atol=5e-2)}


def _perturbed(lp, seed=7):
    """Non-zero b, and a DoRA magnitude moved off its initial norms, so every term is tested."""
    key = jax.random.key(seed)
    lp = with_random_b(lp, key)

    def move(x):
        if isinstance(x, lorax.DoraWeight):
            noise = jax.random.uniform(key, x.m.shape, jnp.float32, 0.8, 1.2)
            return x.replace(m=(x.m * noise).astype(x.m.dtype))
        return x

    return jax.tree.map(move, lp, is_leaf=lambda x: isinstance(x, lorax.Adapter))


def _check_against_merged(fn, lp, x, name):
    trainable, frozen = lorax.split(lp)
    tol = TOL.get(name, dict(rtol=2e-4, atol=2e-5))
    out, ref = jax.jit(lorax.lora(fn))(lp, x), jax.jit(fn)(lorax.merge(lp), x)  # eager runs: test_equivalence
    assert out.dtype == ref.dtype
    assert_trees_close(out, ref, **tol)

    def loss(forward):
        return lambda t: jnp.sum(jnp.square(forward(lorax.combine(t, frozen), x).astype(jnp.float32)))

    g = jax.jit(jax.grad(loss(lorax.lora(fn))))(trainable)
    g_ref = jax.jit(jax.grad(loss(lambda p, x: fn(lorax.merge(p), x))))(trainable)
    assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g_ref)) > 1e-3
    assert_trees_close(g, g_ref, **(tol if name == "gpt-bf16" else dict(rtol=1e-3, atol=1e-5)))


@pytest.mark.parametrize("name", MODELS)
def test_dora_outputs_and_gradients_match_merged_reference(name):
    fn, params, x = make_case(name)
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, alpha=4.0, use_dora=True), fn, params, x)
    kinds = {type(n) for n in jax.tree.leaves(lp, is_leaf=lambda n: isinstance(n, lorax.Adapter))
             if isinstance(n, lorax.Adapter)}
    assert kinds == {lorax.DoraWeight}
    out, ref = jax.jit(lorax.lora(fn))(lp, x), jax.jit(fn)(params, x)
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32),
                               **TOL.get(name, dict(rtol=1e-5, atol=1e-5)))
    lp = _perturbed(lp)
    _check_against_merged(fn, lp, x, name)
    report = lorax.explain(fn, lp, x)
    assert not report.materialized and {r.kind for r in report.rows} == {"dora"}, str(report)


def test_dora_merge_is_magnitude_times_unit_direction():
    w = jax.random.normal(KEY, (6, 5))
    a, b = jax.random.normal(jax.random.key(1), (6, 2)), jax.random.normal(jax.random.key(2), (2, 5))
    m = jnp.arange(1.0, 6.0)
    dw = lorax.DoraWeight(w, a, b, m, scale=0.5)
    direction = w + 0.5 * a @ b
    np.testing.assert_allclose(lorax.merge(dw), m * direction / jnp.linalg.norm(direction, axis=0), rtol=1e-5)
    np.testing.assert_allclose(dw.column_norm(), jnp.linalg.norm(direction, axis=0), rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "gaussian"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "nnx"])
def test_initialisations_leave_outputs_unchanged_and_match_reference(init, name):
    fn, params, x = make_case(name)
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, alpha=4.0, init=init), fn, params, x)
    np.testing.assert_allclose(jax.jit(lorax.lora(fn))(lp, x), jax.jit(fn)(params, x), rtol=2e-4, atol=2e-5)
    if init != "gaussian":  # the factors carry W's principal part: b is not zero, the base is the residual
        lw = lp["params"]["Dense_1"]["kernel"] if name == "mlp" else None
        if lw is not None:
            assert float(jnp.abs(lw.b).max()) > 0.1
            assert not np.allclose(lw.w, params["params"]["Dense_1"]["kernel"])
    _check_against_merged(fn, with_random_b(lp), x, name)


def test_pissa_factors_are_the_top_singular_directions():
    w = jax.random.normal(KEY, (12, 9))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    lp = lorax.init(KEY, lorax.LoraConfig(rank=3, alpha=6.0, init="pissa"), fn, {"w": w}, jnp.ones((1, 12)))
    u, s, vt = np.linalg.svd(np.asarray(w))
    top = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(lp["w"].low_rank(), top, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lp["w"].w, w - top, rtol=1e-4, atol=1e-5)
    fast = lorax.init(KEY, lorax.LoraConfig(rank=3, alpha=6.0, init="pissa_niter_8"), fn, {"w": w}, jnp.ones((1, 12)))
    np.testing.assert_allclose(fast["w"].low_rank(), top, rtol=1e-2, atol=1e-3)


def test_dora_with_pissa_starts_at_the_base_model():
    fn, params, x = make_case("gpt")
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, init="olora", use_dora=True), fn, params, x)
    np.testing.assert_allclose(lorax.lora(fn)(lp, x), fn(params, x), rtol=2e-4, atol=2e-5)


def test_dora_refuses_uses_it_cannot_factor():
    fn, params, x = make_case("conv")
    with pytest.raises(ValueError, match=r"DoraWeight has no factored rule for 'params/Conv_0/kernel' "
                                         r"\(shape \(3, 3, 3, 8\)\), used through 'conv_general_dilated'"):
        lorax.init(KEY, lorax.LoraConfig(rank=2, use_dora=True), fn, params, x)
    fn, params, x = make_case("gpt")
    with pytest.raises(ValueError, match=r"DoraWeight has no factored rule for 'params/wte/embedding'.*'gather'"):
        lorax.init(KEY, lorax.LoraConfig(rank=2, use_dora=True, targets=".*wte/embedding"), fn, params, x)


def test_pissa_adapter_needs_its_initial_factors_for_peft(tmp_path):
    import lorax.peft

    fn = lambda p, x: x @ p["q_proj"]["kernel"]  # noqa: E731
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, init="pissa"), fn, {"q_proj": {"kernel": jnp.ones((4, 6))}},
                    jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"'q_proj/kernel' was initialised with PiSSA or OLoRA.*pass initial="):
        lorax.peft.save_peft(tmp_path, lp, [("q_proj/kernel", "q_proj")])
    assert not any(tmp_path.iterdir())


def test_pissa_rank_above_min_in_out_is_refused():
    fn, params, x = make_case("mlp")
    with pytest.raises(ValueError, match=r"rank 9 for 'params/Dense_2/kernel' \(shape \(32, 8\)\) exceeds"):
        lorax.init(KEY, lorax.LoraConfig(rank=9, init="pissa"), fn, params, x)
    with pytest.raises(ValueError, match=r"init must be .*got 'pissa_niter_x'"):
        lorax.LoraConfig(init="pissa_niter_x")


@pytest.mark.parametrize("kind, init", [("lora", "kaiming_uniform"), ("dora", "kaiming_uniform"),
                                        ("lora", "pissa"), ("dora", "olora"), ("lora", "pissa_niter_2")])
def test_checkpoint_round_trip_for_every_kind_onto_the_original_base(tmp_path, kind, init):
    """A checkpoint holds trained arrays only; after PiSSA/OLoRA the frozen base is a residual
    of the original weight, rebuilt on load from the original base."""
    fn, params, x = make_case("gpt")
    lp = _perturbed(lorax.init(KEY, lorax.LoraConfig(rank=2, use_dora=kind == "dora", init=init), fn, params, x))
    lorax.save(tmp_path, lp, step=1)
    back = lorax.load(tmp_path, params)
    assert_trees_close(lorax.split(back)[0], lorax.split(lp)[0], rtol=0, atol=0)
    np.testing.assert_allclose(lorax.lora(fn)(back, x), lorax.lora(fn)(lp, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["one-tree", "split"])
def test_loraplus_gives_b_ratio_times_the_updates_of_a(style):
    fn, params, x = make_case("mlp")
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2, use_dora=True), fn, params, x))
    tree = lp if style == "one-tree" else lorax.split(lp)[0]
    loss = lambda t: jnp.sum(lorax.lora(fn)(t if style == "one-tree" else lorax.combine(t, lorax.split(lp)[1]), x) ** 2)  # noqa: E731
    grads = jax.grad(loss)(tree)
    for tx in (optax.sgd(0.1), optax.adamw(1e-2, weight_decay=0.1)):
        plain, plus = lorax.optimizer(tx), lorax.optimizer(tx, b_lr_ratio=16.0)
        u1, _ = plain.update(grads, plain.init(tree), tree)
        u16, _ = plus.update(grads, plus.init(tree), tree)
        for n1, n16 in zip(*(jax.tree.leaves(u, is_leaf=lambda n: isinstance(n, lorax.Adapter)) for u in (u1, u16))):
            if isinstance(n1, lorax.DoraWeight):
                np.testing.assert_allclose(n16.a, n1.a, rtol=1e-6)
                np.testing.assert_allclose(n16.b, 16 * n1.b, rtol=1e-5)
                np.testing.assert_allclose(n16.m, 16 * n1.m, rtol=1e-5)  # 1-D: B's rate, as PEFT
                assert float(jnp.abs(n1.b).max()) > 0
    with pytest.raises(ValueError, match="b_lr_ratio must be a finite number > 0, got 0"):
        lorax.optimizer(optax.sgd(0.1), b_lr_ratio=0)


@pytest.mark.parametrize("ratio,error,match", [
    ("16", TypeError, "b_lr_ratio must be a number, got '16'"),
    (True, TypeError, "b_lr_ratio must be a number"),
    (float("nan"), ValueError, "b_lr_ratio must be a finite number"),
    (float("inf"), ValueError, "b_lr_ratio must be a finite number"),
    (-2, ValueError, "b_lr_ratio must be a finite number > 0"),
])
def test_loraplus_ratio_is_validated(ratio, error, match):
    with pytest.raises(error, match=match):
        lorax.optimizer(optax.sgd(0.1), b_lr_ratio=ratio)


def test_optimizer_takes_numpy_ratios_and_refuses_what_is_not_an_optax_transformation():
    fn, params, x = make_case("mlp")
    lp = with_random_b(lorax.init(KEY, lorax.LoraConfig(rank=2), fn, params, x))
    tx = lorax.optimizer(optax.sgd(1.0), b_lr_ratio=np.float32(4))
    grads = jax.tree.map(jnp.ones_like, lorax.split(lp)[0])
    updates, _ = tx.update(grads, tx.init(lorax.split(lp)[0]), lorax.split(lp)[0])
    node = next(n for n in jax.tree.leaves(updates, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))
                if isinstance(n, lorax.LoraWeight))
    np.testing.assert_allclose(node.b, -4.0)
    np.testing.assert_allclose(node.a, -1.0)
    with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation"):
        lorax.optimizer(lambda g: g)


def test_dora_over_an_all_zero_output_column_is_finite_and_matches_the_merge():
    fn = lambda p, x: x @ p["w"]
    w = jax.random.normal(KEY, (6, 4)).at[:, 2].set(0.0)
    x = jax.random.normal(jax.random.key(5), (3, 6))
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, use_dora=True), fn, {"w": w}, x)
    assert np.isfinite(np.asarray(lp["w"].m)).all() and float(lp["w"].m[2]) == 0.0
    np.testing.assert_allclose(lorax.lora(fn)(lp, x), fn({"w": w}, x), rtol=1e-5, atol=1e-6)
    lp = with_random_b(lp)
    trainable, frozen = lorax.split(lp)
    loss = lambda t: jnp.sum(lorax.lora(fn)(lorax.combine(t, frozen), x) ** 2)  # noqa: E731
    merged = lambda t: jnp.sum(fn(lorax.merge(lorax.combine(t, frozen)), x) ** 2)  # noqa: E731
    np.testing.assert_allclose(loss(trainable), merged(trainable), rtol=1e-5)
    for g in jax.tree.leaves(jax.grad(loss)(trainable)):
        assert np.isfinite(np.asarray(g)).all()


def test_contract_declares_fields_once():
    assert lorax.LoraWeight.trained_fields() == ("a", "b")
    assert lorax.DoraWeight.trained_fields() == ("a", "b", "m")
    assert lorax.DoraWeight.frozen_fields() == ("w",)
    lw = lorax.DoraWeight(jnp.ones((2, 4, 3)), jnp.ones((2, 4, 1)), jnp.ones((2, 1, 3)), jnp.ones((2, 3)),
                          a_axes=(1,), b_axes=(2,), stack_axes=(0,))
    trainable, frozen = lorax.split({"w": lw})
    assert trainable["w"].w is None and frozen["w"].m is None
    specs = lorax.partition_specs({"w": lw}, {"w": jax.sharding.PartitionSpec("layers", "data", "model")})
    assert specs["w"].m == jax.sharding.PartitionSpec("layers", "model")
    with pytest.raises(ValueError, match=r"DoraWeight at 'w': factors do not fit w \(2, 4, 3\): got a \(2, 4, 1\) "
                                         r"and b \(2, 1, 3\) and m \(3,\), expected .* and m \(2, 3\)"):
        lorax.merge({"w": lw.replace(m=jnp.ones(3))})
    with pytest.raises(ValueError, match="whose merge does not add a delta independent of w"):
        lorax.unmerge(lorax.merge({"w": lw}), trainable)


def test_dora_step_builds_no_weight_sized_array():
    """The DoRA step's outputs hold no array of a weight's shape, and its gradient program
    makes none (so none can be kept as a residual): the norm comes from ‖W‖², Aᵀ·W and AᵀA
    terms, with no gradient."""
    widths = dict(d=64, heads=4, layers=2, vocab=128, batch=2, seq=16)
    step, (trainable, opt, frozen, ids) = gpt.train_steps(variants=("lora",), kind="dora", **widths)["lora"]
    weight_shapes = {tuple(n.w.shape) for n in jax.tree.leaves(frozen, is_leaf=lambda n: isinstance(n, lorax.Adapter))
                     if isinstance(n, lorax.Adapter)}
    outs = jax.eval_shape(step, trainable, opt, frozen, ids)
    assert weight_shapes and not weight_shapes & {tuple(x.shape) for x in jax.tree.leaves(outs)}
    fn = gpt.model(**widths, concrete=False)[0]
    loss = lambda t, f, ids: gpt.xent(lorax.lora(fn)(lorax.combine(t, f), ids), ids)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, frozen, ids).jaxpr
    made = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if eqn.primitive.name != "stop_gradient"}
    assert not weight_shapes & made


def test_rule_table_gives_every_primitive_both_sides():
    """One registration per primitive holds how init reads a use and how lora computes it."""
    from lorax._src import compat
    from lorax._src.tracing.table import RULES

    for name, entry in RULES.items():
        assert entry.kind in ("view", "product", "control") and callable(entry.read), name
        no_apply = name in compat.CUSTOM_CALLS  # JAX must run its own derivative: materialized
        assert no_apply or entry.handler(lorax.LoraWeight) is not None, name
        assert no_apply or entry.handler(lorax.DoraWeight) is not None or entry.kind == "product", name


def test_integer_cast_of_a_weight_is_neither_read_nor_factored():
    """init and lora agree: a cast to an integer dtype is not a view of the weight."""
    fn = lambda p, x: x @ p["w"] + jnp.sum(p["w"].astype(jnp.int32))  # noqa: E731
    w = jnp.arange(12.0).reshape(4, 3) / 7
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2), fn, {"w": w}, jnp.ones((1, 4)))
    lp = with_random_b(lp)
    assert lorax.explain(fn, lp, jnp.ones((1, 4))).rows[0].how == "materialized: convert_element_type"
    np.testing.assert_allclose(lorax.lora(fn)(lp, jnp.ones((1, 4))), fn(lorax.merge(lp), jnp.ones((1, 4))), rtol=1e-5)


def test_a_base_class_used_as_a_kind_says_which_method_is_unwritten():
    lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
    bare = lorax.extend.LowRank(lw.w, lw.a, lw.b)
    with pytest.raises(NotImplementedError, match=r"LowRank does not write merged\(\)"):
        lorax.merge({"w": bare})
    with pytest.raises(NotImplementedError, match=r"LowRank does not write create\(\)"):
        lorax.extend.LowRank.create(None, None, lw.w, None)
    assert float(jnp.abs(bare.low_rank() - lw.low_rank()).max()) == 0.0  # the family's maths is there
