"""Many adapters, one base: banks, per-example routing, weighted combinations, files.

Each path is checked against its materialized reference ``fn(lorax.merge(...))``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, with_random_b
from models import GPT

import lorax
import lorax.peft
from lorax import adapters

MODEL = GPT(vocab=64, d=32, layers=2, heads=4, max_len=8)  # nn.scan over remat blocks, tied head
IDS = jax.random.randint(KEY, (4, 8), 0, 64)
FN = lambda p, ids: MODEL.apply(p, ids)  # noqa: E731
BASE_PARAMS = MODEL.init(KEY, IDS)
QV = r".*/(query|value)/kernel"


def adapter(seed, rank, targets="all-linear", alpha=None):
    config = lorax.LoraConfig(rank=rank, alpha=alpha or 2.0 * rank, targets=targets)
    return with_random_b(lorax.init(jax.random.key(seed), config, FN, BASE_PARAMS, IDS), jax.random.key(seed + 7))


@pytest.fixture(scope="module")
def three():
    return {"math": adapter(1, 2), "code": adapter(2, 4, QV, alpha=3.0), "chat": adapter(3, 3)}


@pytest.fixture(scope="module")
def bank(three):
    return adapters.bank(three)


def merged_logits(params, ids=IDS):
    return FN(lorax.merge(params), ids)


def close(a, b, tol=2e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


def test_select_gives_back_each_adapter_and_merge_of_a_routed_bank(bank, three):
    assert adapters.names(bank) == ("math", "code", "chat")
    for name, tree in three.items():
        close(lorax.merge(adapters.select(bank, name))["params"]["h"], lorax.merge(tree)["params"]["h"], 1e-6)
        close(lorax.merge(adapters.route(bank, name))["params"]["h"], lorax.merge(tree)["params"]["h"], 1e-6)
    only_qv = adapters.select(bank, "code")["params"]["h"]
    assert isinstance(only_qv["query"]["kernel"], lorax.LoraWeight)
    assert not isinstance(only_qv["fc"]["kernel"], lorax.Adapter)  # code adapts q, v only: fc comes back plain


def test_per_example_mixed_batch_equals_each_example_alone_inside_scan(bank, three):
    index = adapters.index_of(bank, ["chat", None, "math", "code"])
    out = jax.jit(lorax.lora(FN))(adapters.route(bank, index), IDS)
    refs = [merged_logits(three["chat"]), FN(BASE_PARAMS, IDS), merged_logits(three["math"]),
            merged_logits(three["code"])]
    for i, ref in enumerate(refs):
        close(out[i], ref[i])
    for name in three:  # one adapter for the whole batch (a scalar index)
        close(jax.jit(lorax.lora(FN))(adapters.route(bank, name), IDS), merged_logits(three[name]))
    rows = lorax.explain(FN, adapters.route(bank, index), IDS).rows
    assert {r.kind for r in rows} == {"lora_bank"} and {r.how for r in rows} == {"factored (dot_general)"}


def test_gradients_reach_only_the_routed_adapters(bank):
    trainable, frozen = lorax.split(adapters.route(bank, adapters.index_of(bank, ["math", "math", None, "chat"])))
    loss = lambda t: lorax.lora(FN)(lorax.combine(t, frozen), IDS).sum()  # noqa: E731
    g = jax.grad(loss)(trainable)["params"]["h"]["fc"]["kernel"]
    per_adapter = jnp.abs(g.a).sum(axis=tuple(i for i in range(g.a.ndim) if i != 1))
    assert per_adapter[0] > 0 and per_adapter[2] > 0 and per_adapter[1] == 0  # code: unused, and no fc factor
    assert adapters.select(bank, "code")["params"]["h"]["fc"]["kernel"] is bank["params"]["h"]["fc"]["kernel"].w


def test_swapping_adapters_and_indices_reuses_one_compilation(three):
    traces = []

    @jax.jit
    def forward(params, index, ids):
        traces.append(1)
        return lorax.lora(FN)(adapters.route(params, index), ids)

    first = adapters.bank({"x": three["math"], "y": three["chat"]})
    # other adapters in the same slots: other values, scales and (padded) ranks, the same shapes
    second = adapters.bank({"x": adapter(8, 3, alpha=7.0), "y": adapter(9, 2)})
    for params, index in ((first, [0, 1, -1, 0]), (second, [1, 1, 0, -1]), (first, [1, 0, 0, 1])):
        forward(params, jnp.asarray(index, jnp.int32), IDS)
    out = forward(second, jnp.asarray([0, 0, 0, 0], jnp.int32), IDS)
    assert len(traces) == 1 and forward._cache_size() == 1
    close(out, merged_logits(adapters.select(second, "x")))


def test_add_delete_rename_and_ranks_padded_exactly(bank, three):
    grown = adapters.add(bank, "big", adapter(4, 6, QV))
    node = grown["params"]["h"]["query"]["kernel"]
    assert node.adapter_ranks == (2, 4, 3, 6) and node.a.shape[-1] == 6 and node.a.shape[1] == 4  # (stack, n, ...)
    close(lorax.merge(adapters.select(grown, "chat"))["params"]["h"], lorax.merge(three["chat"])["params"]["h"], 1e-6)
    smaller = adapters.delete(grown, "code")
    assert adapters.names(smaller) == ("math", "chat", "big")
    renamed = adapters.rename(smaller, "big", "qv")
    assert adapters.names(renamed) == ("math", "chat", "qv")
    only = adapters.delete(adapters.delete(adapters.delete(renamed, "qv"), "chat"), "math")
    assert jax.tree.structure(only) == jax.tree.structure(BASE_PARAMS)  # the last one gone: the plain base
    fresh = lorax.init(jax.random.key(5), lorax.LoraConfig(rank=2), FN, adapters.base(bank), IDS)
    assert adapters.names(adapters.add(bank, "fresh", fresh))[-1] == "fresh"


def _delta(params, name):
    """The materialized ΔW of every adapted weight: merge(select) minus the base."""
    merged = lorax.merge(adapters.select(params, name))
    return jax.tree.map(lambda m, w: m - w, merged, BASE_PARAMS)


def _weighted_sum(params, names, weights):
    deltas = [_delta(params, n) for n in names]
    return jax.tree.map(lambda *ds: sum(w * d for w, d in zip(weights, ds)), *deltas)


def test_weighted_cat_is_exact_and_svd_error_is_the_best_rank_k(bank):
    names, weights = ["math", "chat"], [0.7, -0.4]
    want = _weighted_sum(bank, names, weights)
    cat = adapters.weighted(bank, "mix", names, weights, how="cat")
    assert cat["params"]["h"]["fc"]["kernel"].ranks[-1] == 5  # ranks add
    close(_delta(cat, "mix"), want)
    full = adapters.weighted(bank, "mix", names, weights, how="svd", rank=5)  # rank of the sum: exact
    close(_delta(full, "mix"), want)
    low = adapters.weighted(bank, "mix", names, weights, how="svd", rank=2)
    got, ref = _delta(low, "mix")["params"]["h"]["fc"]["kernel"], want["params"]["h"]["fc"]["kernel"]
    for layer in range(2):  # Eckart–Young: the error is the norm of the dropped singular values
        sv = np.linalg.svd(np.asarray(ref[layer]), compute_uv=False)
        assert math.isclose(float(jnp.linalg.norm(got[layer] - ref[layer])), float(np.sqrt((sv[2:] ** 2).sum())),
                            rel_tol=1e-3)


def test_weighted_linear_matches_peft_product_of_sums(bank):
    mix = adapters.weighted(bank, "mix", ["math"], [0.5], how="linear")  # one source: exact
    close(_delta(mix, "mix"), _weighted_sum(bank, ["math"], [0.5]))
    twin = adapters.add(bank, "math2", adapters.select(bank, "math"))
    mix = adapters.weighted(twin, "mix", ["math", "math2"], [0.5, -0.2], how="linear")
    fc = twin["params"]["h"]["fc"]["kernel"]  # (stack, adapter, ...) factors
    a, b = [fc.a[:, i, :, :2] for i in (0, 3)], [fc.b[:, i, :2] for i in (0, 3)]
    ws = [0.5 * float(fc.scales[0]), -0.2 * float(fc.scales[3])]
    big_a = sum(math.copysign(math.sqrt(abs(w)), w) * ai for w, ai in zip(ws, a))
    big_b = sum(math.sqrt(abs(w)) * bi for w, bi in zip(ws, b))
    got = _delta(mix, "mix")["params"]["h"]["fc"]["kernel"]
    close(got, jnp.einsum("lir,lro->lio", big_a, big_b), 1e-6)
    with pytest.raises(ValueError, match="how='linear' needs sources of one rank"):
        adapters.weighted(bank, "mix", ["math", "chat"], [1.0, 1.0], how="linear")


def test_bad_input_is_refused_with_the_path_and_nothing_changes(bank, three, tmp_path):
    before = jax.tree.map(np.asarray, lorax.split(bank)[0])
    with pytest.raises(ValueError, match=r"no adapter 'nope'; the bank holds \['math', 'code', 'chat'\]"):
        adapters.select(bank, "nope")
    with pytest.raises(ValueError, match=r"outside \[-1, 3\)"):
        adapters.route(bank, jnp.array([0, 3, -1, 1]))
    with pytest.raises(ValueError, match="already holds an adapter 'math'"):
        adapters.add(bank, "math", three["chat"])
    other = MODEL.init(jax.random.key(9), IDS)
    stranger = lorax.init(KEY, lorax.LoraConfig(rank=2), FN, other, IDS)
    with pytest.raises(ValueError, match="frozen weight differs from the bank's base: the adapter is for another base"):
        adapters.add(bank, "stranger", stranger)
    with pytest.raises(ValueError, match="not routed"):
        lorax.lora(FN)(bank, IDS)
    with pytest.raises(ValueError, match="lorax.merge: 'params/.*'.* routed per example"):
        lorax.merge(adapters.route(bank, [0, 1, 2, 0]))
    h = bank["params"]["h"]
    mixed = {**bank, "params": {**bank["params"], "h": {**h, "fc": three["chat"]["params"]["h"]["fc"]}}}
    mixing = r": 'params/h/key/kernel' is a LoraBank, a bank of several named adapters, among single adapters"
    with pytest.raises(ValueError, match="lorax.peft.save_peft" + mixing):
        lorax.peft.save_peft(tmp_path / "mixed", mixed, [("x", "y")])
    with pytest.raises(ValueError, match="lorax.save" + mixing):
        lorax.save(tmp_path / "mixed", mixed)
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(ValueError, match=r"leading axis must be the 3 examples"):
        lorax.lora(FN)(adapters.route(bank, [0, 1, 2]), IDS)
    with pytest.raises(ValueError, match="must be a non-empty string"):
        adapters.rename(bank, "math", "../x")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), lorax.split(bank)[0], before)


def test_out_of_range_traced_index_selects_the_base(bank):
    out = jax.jit(lambda p, i: lorax.lora(FN)(adapters.route(p, i), IDS))(bank, jnp.array([7, -5, 0, 0]))
    close(out[:2], FN(BASE_PARAMS, IDS)[:2])


def test_checkpoint_per_name_round_trip_and_optimizer(bank, three, tmp_path):
    folders = adapters.save(tmp_path, bank)
    assert sorted(p.parent.name for p in folders.values()) == ["chat", "code", "math"]
    back = adapters.load(tmp_path, BASE_PARAMS, only=["math", "code", "chat"])
    for name in three:
        close(merged_logits(adapters.select(back, name)), merged_logits(three[name]), 1e-6)
    # one verb: lorax.save and lorax.load take a bank tree as lorax.adapters.save and load do
    assert lorax.save(tmp_path / "verb", bank) == tmp_path / "verb"
    assert sorted(p.name for p in (tmp_path / "verb").iterdir()) == ["chat", "code", "math"]
    again = lorax.load(tmp_path / "verb", BASE_PARAMS)
    assert adapters.names(again) == ("chat", "code", "math")
    for name in three:
        close(merged_logits(adapters.select(again, name)), merged_logits(three[name]), 1e-6)
    with pytest.raises(ValueError, match="state= is saved with single adapters"):
        lorax.save(tmp_path / "state", bank, state={"step": 1})
    assert not (tmp_path / "state").exists()
    import optax
    trainable, _ = lorax.split(bank)
    tx = lorax.optimizer(optax.adam(1e-2))
    state = tx.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, state, trainable)
    fc = updates["params"]["h"]["fc"]["kernel"]
    assert fc.scales is None and fc.w is None and float(jnp.abs(fc.a).max()) > 0


def test_split_trains_the_factors_only(bank):
    routed = adapters.route(bank, "math")
    trainable, frozen = (half["params"]["h"]["fc"]["kernel"] for half in lorax.split(routed))
    assert (trainable.w, trainable.scales, trainable.ranks, trainable.index) == (None,) * 4
    assert trainable.a.shape == (2, 3, 32, 3)  # fc: ranks 2, 0 (code adapts q, v only), 3
    assert frozen.a is None and int(frozen.index) == 0
