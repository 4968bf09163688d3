"""`lorax.quantize(params, "bf16")`: frozen bf16 weights held as their bits (`lorax.Bf16Bits`).
Exact values, every use inside `lorax.lora` matching the merged model, the tree operations,
bad input refused, and a compiled step that holds no copy of a bits stack."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import lorax

BF16, F32 = jnp.bfloat16, jnp.float32
X = jax.random.normal(jax.random.key(9), (16, 48))


def mm(x, w):
    """A bf16 product accumulated in fp32, as the example LLaMA's bf16 projections are."""
    return jax.lax.dot_general(x.astype(BF16), w.astype(BF16), (((1,), (0,)), ((), ())), preferred_element_type=F32)


def scanned(p, x):
    """An embedding lookup, then three layers in a ``scan`` over stacked weights: ``up``
    (adapted) and ``down`` (plain), and a head tied to the table, sliced in a loop."""
    h = jnp.take(p["table"], jnp.argmax(x, axis=-1) % 64, axis=0) + x

    def layer(h, w):
        return mm(jnp.tanh(mm(h, w["up"])), w["down"]), None

    h = jax.lax.scan(layer, h, {"up": p["up"], "down": p["down"]})[0]

    def head(carry, start):
        rows = jax.lax.dynamic_slice_in_dim(p["table"], start, 16, 0)
        return carry, jax.lax.dot_general(h.astype(BF16), rows, (((1,), (1,)), ((), ())), preferred_element_type=F32)

    return jnp.concatenate(jax.lax.scan(head, 0, jnp.arange(4) * 16)[1], axis=-1)


def weights():
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    return {"up": (jax.random.normal(k1, (3, 48, 40)) / 7).astype(BF16),
            "down": (jax.random.normal(k2, (3, 40, 48)) / 6).astype(BF16),
            "table": (jax.random.normal(k3, (64, 48)) / 5).astype(BF16)}


def adapted(params):
    out = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up"), scanned, params, X)
    return {**out, "up": out["up"].replace(b=jax.random.normal(jax.random.key(3), out["up"].b.shape) / 5)}


def loss_of(fn, params):
    return jnp.mean(fn(params, X) ** 2)


def test_bf16_bits_hold_a_bf16_weight_exactly_and_round_an_fp32_one_like_astype():
    w = weights()
    held = lorax.quantize(w, "bf16")
    assert all(isinstance(held[k], lorax.Bf16Bits) and held[k].bits.dtype == jnp.uint16 for k in w)
    assert all(bool((held[k].dequantize() == w[k]).all()) for k in w)
    assert held["up"].shape == (3, 48, 40) and held["up"].dtype == BF16 and held["up"].nbytes == w["up"].nbytes
    fp32 = jax.random.normal(jax.random.key(0), (8, 4))
    rounded = lorax.quantize({"w": fp32}, "bf16")["w"]
    assert bool((rounded.dequantize() == fp32.astype(BF16)).all())
    assert repr(rounded) == "Bf16Bits(bfloat16[8, 4])"
    again = lorax.quantize({"w": rounded, "v": fp32}, "bf16")
    assert again["w"] is rounded  # held already: left as it is
    merged = lorax.merge(held)
    assert all(merged[k].dtype == BF16 and bool((merged[k] == w[k]).all()) for k in w)


@pytest.mark.parametrize("narrow", [True, False])
def test_lora_over_bits_matches_the_merged_model_in_outputs_and_adapter_gradients(narrow):
    """Bits in the tree (the stacks, the looked-up and sliced table, and the adapter's base)
    give what the same model over the plain bf16 weights gives, outputs and gradients."""
    plain = adapted(weights())
    held = lorax.quantize(plain, "bf16")
    assert isinstance(held["up"].w, lorax.Bf16Bits) and isinstance(held["table"], lorax.Bf16Bits)
    run = lorax.lora(scanned, low_precision_backward=narrow)
    np.testing.assert_allclose(run(held, X), scanned(lorax.merge(plain), X), rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(run(held, X), run(plain, X))
    grads = {}
    for name, tree in (("bits", held), ("plain", plain)):
        trained, frozen = lorax.split(tree)
        grads[name] = jax.jit(jax.grad(lambda t: loss_of(run, lorax.combine(t, frozen))))(trained)  # noqa: B023
    assert_trees_close(grads["bits"], grads["plain"], rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(grads["bits"]["up"].a).max()) > 1e-4


def test_a_lookup_in_a_bits_table_looks_up_rows_and_fills_nan_out_of_range():
    table = (jax.random.normal(jax.random.key(0), (10, 4)) / 3).astype(BF16)
    held = lorax.quantize({"t": table}, "bf16")
    ids = jnp.array([0, 9, 3, 10, -11])
    got = jax.jit(lorax.lora(lambda p, i: jnp.take(p["t"], i, axis=0)))(held, ids)
    want = jnp.take(table, ids, axis=0)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got[:3], want[:3])
    assert bool(jnp.isnan(got[3:]).all()) and bool(jnp.isnan(want[3:]).all())
    clipped = lorax.lora(lambda p, i: jnp.take(p["t"], i, axis=0, mode="clip"))(held, ids)
    np.testing.assert_array_equal(clipped, jnp.take(table, ids, axis=0, mode="clip"))


def test_a_compiled_step_over_bits_holds_no_copy_of_a_stack_or_of_the_table():
    """A bf16 argument is reinterpreted to bits inside the step, a copy XLA:CPU writes once per
    step; bits in the tree come in as they are: no buffer of a stack's or the table's shape, in
    any dtype, among the step's temporaries, and less memory than over plain bf16."""
    tx = optax.adam(1e-3)
    steps = {}
    for name, tree in (("plain", adapted(weights())), ("bits", lorax.quantize(adapted(weights()), "bf16"))):
        trained, frozen = lorax.split(tree)

        def step(t, opt, frozen):
            grads = jax.grad(lambda t: loss_of(lorax.lora(scanned), lorax.combine(t, frozen)))(t)  # noqa: B023
            updates, opt = tx.update(grads, opt, t)
            return optax.apply_updates(t, updates), opt

        steps[name] = jax.jit(step, donate_argnums=(0, 1)).lower(trained, tx.init(trained), frozen).compile()
    assert _whole_copies(steps["plain"]) >= {"u16[3,48,40]", "u16[3,40,48]", "f32[64,48]"}
    assert not _whole_copies(steps["bits"])
    temps = {k: c.memory_analysis().temp_size_in_bytes for k, c in steps.items()}
    assert temps["bits"] < temps["plain"]


def _whole_copies(compiled) -> set[str]:
    """The arrays of a stack's or the table's shape that ``compiled`` computes, not the
    parameters it passes along."""
    found = set()
    for line in compiled.as_text().splitlines():
        match = re.search(r"= (\w+\[(?:3,48,40|3,40,48|64,48)\])\S* ([\w-]+)\(", line)
        if match and match[2] not in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            found.add(match[1])
    return found


def test_bits_split_combine_explain_and_partition_specs_treat_them_as_frozen_bases():
    held = lorax.quantize(adapted(weights()), "bf16")
    trained, frozen = lorax.split(held)
    assert not [x for x in jax.tree.leaves(trained) if x.dtype == jnp.uint16]
    assert isinstance(frozen["down"], lorax.Bf16Bits) and isinstance(frozen["up"].w, lorax.Bf16Bits)
    assert_trees_close(lorax.merge(lorax.combine(trained, frozen)), lorax.merge(held))
    rows = {r.path: r for r in lorax.explain(scanned, held, X).rows}
    assert rows["down"].kind == "frozen bf16" and "reinterpreted per use" in rows["down"].how
    assert rows["up"].how.endswith("over bf16")
    specs = lorax.partition_specs(held)
    assert isinstance(specs["down"], lorax.Bf16Bits) and isinstance(specs["up"].w, lorax.Bf16Bits)


def test_merge_quantized_over_bits_gives_bits_of_the_merged_weight():
    held = lorax.quantize(adapted(weights()), "bf16")
    tree, errors = lorax.merge_quantized(held)
    merged = lorax.merge(held)["up"]  # bf16, as the base is: holding it as bits loses nothing
    assert isinstance(tree["up"], lorax.Bf16Bits) and errors["up"] == 0.0 and merged.dtype == BF16
    np.testing.assert_array_equal(tree["up"].dequantize(), merged)
    assert isinstance(tree["down"], lorax.Bf16Bits) and tree["down"] is held["down"]


def test_bad_arguments_to_bf16_are_refused_by_name_and_change_nothing():
    w = {"k": jnp.ones((4, 3)), "bias": jnp.ones(3)}
    with pytest.raises(ValueError, match="bf16 has no blocks; leave block and axis unset, got block=32"):
        lorax.quantize(w, "bf16", block=32)
    with pytest.raises(ValueError, match="bf16 has no blocks.*axis=-1"):
        lorax.quantize(w, "bf16", axis=-1)
    with pytest.raises(ValueError, match="double_quant applies to nf4, not 'bf16'"):
        lorax.quantize(w, "bf16", double_quant=True)
    with pytest.raises(ValueError, match=r"'k' \(shape \(4, 3\)\): the weight holds NaN or inf \(1 values\)"):
        lorax.quantize({"k": w["k"].at[0, 0].set(jnp.nan)}, "bf16")
    with pytest.raises(ValueError, match=r"'k' \(shape \(4, 3\)\): its largest magnitude 3.4\d*e\+38 overflows bf16"):
        lorax.quantize({"k": w["k"].at[0, 0].set(jnp.finfo(F32).max)}, "bf16")
    with pytest.raises(ValueError, match="targets='nothing' matched no weight"):
        lorax.quantize(w, "bf16", targets="nothing")
    with pytest.raises(ValueError, match=r"'k' \(shape \(4, 3\)\) is marked Trainable"):
        lorax.quantize({"k": lorax.Trainable(w["k"])}, "bf16")
    assert w["k"].dtype == F32


def test_bits_are_frozen_where_a_weight_would_be_trained():
    held = lorax.quantize(weights(), "bf16")
    trained = r"'down' \(shape \(3, 40, 48\)\) is a quantized weight marked Trainable \(bf16\)"
    with pytest.raises(ValueError, match=trained):
        lorax.lora(scanned)({**held, "down": lorax.Trainable(held["down"])}, X)
    config = lorax.LoraConfig(rank=4, targets="up", trainable="down")
    with pytest.raises(ValueError, match=r"'down' \(shape \(3, 40, 48\)\) is a quantized weight \(bf16\) and matches"):
        lorax.init(jax.random.key(1), config, scanned, held, X)
    with pytest.raises(ValueError, match=r"'up' \(shape \(3, 48, 40\)\) is quantized \(bf16\); init='pissa'"):
        lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, targets="up", init="pissa"), scanned, held, X)


def test_a_checkpoint_over_bits_loads_onto_bits_or_the_plain_bf16_base_and_not_another(tmp_path):
    plain = adapted(weights())
    held = lorax.quantize(plain, "bf16")
    lorax.save(tmp_path / "ckpt", held)
    for base in (lorax.quantize(weights(), "bf16"), weights()):
        back = lorax.load(tmp_path / "ckpt", base)
        assert type(back["up"].w) is type(base["up"]) and type(back["down"]) is type(base["down"])
        assert_trees_close(lorax.merge(back), lorax.merge(held), rtol=0, atol=0)
    other = lorax.quantize({k: v * 2 for k, v in weights().items()}, "bf16")
    with pytest.raises(ValueError, match="not the one the adapters.*were trained on:\n  up: recorded norm"):
        lorax.load(tmp_path / "ckpt", other)
