"""Sharding checks on 8 fake CPU devices; run by test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (skipped when fewer devices exist)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorax

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

D, H = 64, 128
LAYOUTS = {  # (w1 spec, w2 spec, batch spec) on a (data=2, model=4) mesh
    "fsdp": (P("data", None), P("data", None), P("data")),
    "tensor-parallel": (P(None, "model"), P("model", None), P("data")),
}


def fn(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def loss_fn(out):
    return jnp.mean(jnp.square(out - 0.5))


def base_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (D, H)) / 8, "w2": jax.random.normal(k2, (H, D)) / 8}


def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def sharded_params(m, *specs):
    return {k: jax.device_put(v, NamedSharding(m, s)) for (k, v), s in zip(base_params().items(), specs)}


def adapted(params):
    x = jnp.ones((16, D))
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4), fn, params, x)
    # non-zero b keeping the derived sharding
    return jax.tree.map(lambda n: n if not isinstance(n, lorax.LoraWeight) else
                        n.replace(b=jax.device_put(jnp.full(n.b.shape, 0.05), n.b.sharding)),
                        lp, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))


def grads_single(lp, x):
    trainable, frozen = lorax.split(jax.device_get(lp))
    return jax.grad(lambda t: loss_fn(lorax.lora(fn)(lorax.combine(t, frozen), x)))(trainable)


def collective_bytes(hlo: str) -> int:
    total = 0
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(", line)
        if m:
            for dtype, dims in re.findall(r"(f32|bf16|f16|s32)\[([\d,]*)\]", m.group(1)):
                size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                total += size * {"f32": 4, "s32": 4, "bf16": 2, "f16": 2}[dtype]
    return total


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_places_factors_after_the_base_weight(layout):
    s1, s2, _ = LAYOUTS[layout]
    m = mesh()
    params = sharded_params(m, s1, s2)
    lp = adapted(params)
    for name, spec in (("w1", s1), ("w2", s2)):
        lw = lp[name]
        assert lw.w.sharding.spec == spec and lw.w is params[name]  # W untouched, not gathered
        a_spec, b_spec = lorax._src.sharding.factor_specs(lw, spec).values()
        assert lw.a.sharding.spec == a_spec == P(spec[0], None)
        assert lw.b.sharding.spec == b_spec == P(None, spec[1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_peft_places_factors_after_the_base_weight_and_keeps_dropout(layout, tmp_path):
    import lorax.peft

    s1, s2, _ = LAYOUTS[layout]
    params = sharded_params(mesh(), s1, s2)
    x = jnp.ones((16, D))
    mapping = lambda path, index: path  # noqa: E731  (torch module names = lorax paths here)
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=4, dropout=0.1), fn, params, x)
    folder = lorax.peft.save_peft(tmp_path / "adapter", lp, mapping)
    back = lorax.peft.load_peft(folder, fn, params, x, mapping=mapping)
    for name, spec in (("w1", s1), ("w2", s2)):
        assert back[name].dropout == 0.1 and back[name].w is params[name]
        assert back[name].a.sharding.spec == P(spec[0], None) and back[name].b.sharding.spec == P(None, spec[1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jit_step_with_named_shardings_matches_single_device(layout):
    s1, s2, sx = LAYOUTS[layout]
    m = mesh()
    params = sharded_params(m, s1, s2)
    lp = adapted(params)
    x = jax.device_put(jax.random.normal(jax.random.key(2), (16, D)), NamedSharding(m, sx))
    specs = lorax.partition_specs(lp)
    t_specs, f_specs = lorax.split(specs)
    shard = lambda tree: jax.tree.map(lambda s: NamedSharding(m, s), tree)  # noqa: E731
    trainable, frozen = lorax.split(lp)
    tx = optax.adam(1e-2)
    opt = tx.init(trainable)

    @functools.partial(jax.jit, out_shardings=(shard(t_specs), None, None))
    def step(t, f, opt, x):
        value, g = jax.value_and_grad(lambda t: loss_fn(lorax.lora(fn)(lorax.combine(t, f), x)))(t)
        updates, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, updates), opt, g

    new_t, _, g = step(trainable, frozen, opt, x)
    assert_trees_close(g, grads_single(lp, jax.device_get(x)), rtol=1e-4, atol=1e-6)
    assert new_t["w1"].a.sharding.spec == t_specs["w1"].a
    compiled = step.lower(trainable, frozen, opt, x).compile().as_text()
    base = jax.jit(jax.grad(lambda p, x: loss_fn(fn(p, x)), argnums=1)).lower(params, x).compile().as_text()
    extra = collective_bytes(compiled) - collective_bytes(base)
    w_bytes = D * H * 4
    print(f"\n{layout}: collective bytes base {collective_bytes(base)}, lora step {collective_bytes(compiled)}, "
          f"extra {extra}, one W {w_bytes}")
    assert extra < w_bytes / 4  # adapter traffic only: no W-sized gather or reduction added


def test_pmap_data_parallel_matches_single_device():
    lp = adapted(base_params())
    trainable, frozen = lorax.split(lp)
    x = jax.random.normal(jax.random.key(2), (16, D))
    n = jax.device_count()

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, None, 0))
    def grads(t, f, x):
        g = jax.grad(lambda t: loss_fn(lorax.lora(fn)(lorax.combine(t, f), x)))(t)
        return jax.lax.pmean(g, "batch")

    g = grads(trainable, frozen, x.reshape(n, -1, D))
    assert_trees_close(jax.tree.map(lambda v: v[0], g), grads_single(lp, x), rtol=1e-4, atol=1e-6)


def test_shard_map_data_parallel_matches_single_device():
    m = mesh()
    lp = adapted(base_params())
    trainable, frozen = jax.device_put(lorax.split(lp), NamedSharding(m, P()))
    x = jax.random.normal(jax.random.key(2), (16, D))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=m, in_specs=(P(), P(), P(("data", "model"))), out_specs=P())
    def grads(t, f, x):  # the mean loss over all shards; shard_map sums the replicated grads
        local = lambda t: loss_fn(lorax.lora(fn)(lorax.combine(t, f), x))  # noqa: E731
        return jax.grad(lambda t: jax.lax.pmean(local(t), ("data", "model")))(t)

    assert_trees_close(grads(trainable, frozen, x), grads_single(lp, x), rtol=1e-4, atol=1e-6)


def test_merge_keeps_w_sharding_and_can_donate():
    m = mesh()
    params = sharded_params(m, P(None, "model"), P("model", None))
    lp = adapted(params)
    expected = jax.device_get(lorax.merge(jax.device_get(lp)))
    merged = jax.jit(lorax.merge, donate_argnums=0)(lp)
    for name in ("w1", "w2"):
        assert merged[name].sharding.is_equivalent_to(params[name].sharding, 2)
    assert_trees_close(merged, expected, rtol=1e-6, atol=1e-6)


def test_flax_partitioning_metadata_is_respected():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            return nn.Dense(H, kernel_init=init, use_bias=False)(x)

    x = jnp.ones((4, D))
    variables = Net().init(jax.random.key(0), x)
    apply = lambda v, x: Net().apply(v, x)  # noqa: E731
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2), apply, variables, x)
    specs = lorax.partition_specs(lp, nn.get_partition_spec(variables))
    kernel = specs["params"]["Dense_0"]["kernel"].value
    assert (kernel.w, kernel.a, kernel.b) == (P(None, "model"), P(None, None), P(None, "model"))
    assert [r.path for r in lorax.explain(apply, lp, x).rows] == ["params/Dense_0/kernel"]


def test_nnx_sharding_metadata_is_respected():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.lin = nnx.Linear(D, H, kernel_init=init, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    with jax.set_mesh(mesh()):
        graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    lp = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2), apply, state, jnp.ones((4, D)))
    kernel = lp["lin"]["kernel"].get_value()
    assert (kernel.a.sharding.spec, kernel.b.sharding.spec) == (P(None, None), P(None, "model"))
    specs = lorax.partition_specs(lp, nnx.get_partition_spec(state))
    assert specs["lin"]["kernel"].get_value().b == P(None, "model")


def test_bank_routed_per_example_on_a_sharded_batch_matches_each_example_alone():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    fn3 = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731  (x: [batch, seq, D])
    base = base_params()
    x = jax.random.normal(jax.random.key(3), (8, 3, D))
    trees = {}
    for seed in range(3):
        lp = lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2 + seed), fn3, base, x)
        trees[f"t{seed}"] = jax.tree.map(lambda n, s=seed: n.replace(b=jax.random.normal(jax.random.key(s), n.b.shape))
                                         if isinstance(n, lorax.LoraWeight) else n, lp,
                                         is_leaf=lambda n: isinstance(n, lorax.LoraWeight))
    bank = lorax.adapters.bank(trees)
    index = jnp.array([0, 1, 2, -1, 2, 1, 0, 0], jnp.int32)
    batch = NamedSharding(mesh, P("data"))
    forward = jax.jit(lambda p, i, x: lorax.lora(fn3)(lorax.adapters.route(p, i), x))
    out = forward(bank, jax.device_put(index, batch), jax.device_put(x, batch))
    assert out.sharding.spec[0] == "data"  # the output stays sharded with the batch
    for i, k in enumerate(index.tolist()):
        alone = base if k < 0 else lorax.merge(trees[f"t{k}"])
        np.testing.assert_allclose(out[i], fn3(alone, x[i:i + 1])[0], rtol=1e-4, atol=1e-4)


MESHES = {"2x4": (8, (2, 4)), "1x2 (two devices)": (2, (1, 2))}


def mesh_of(name):
    count, shape = MESHES[name]
    return Mesh(np.array(jax.devices()[:count]).reshape(shape), ("data", "model"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_resume_on_a_mesh_continues_like_the_uninterrupted_run(layout, mesh_name, tmp_path):
    s1, s2, sx = LAYOUTS[layout]
    m = mesh_of(mesh_name)
    params = sharded_params(m, s1, s2)
    fresh = adapted(params)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    xs = [jax.device_put(jax.random.normal(jax.random.key(10 + i), (16, D)), NamedSharding(m, sx)) for i in range(4)]

    @jax.jit
    def step(t, f, opt, x):
        g = jax.grad(lambda t: loss_fn(lorax.lora(fn)(lorax.combine(t, f), x)))(t)
        updates, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, updates), opt

    trainable, frozen = lorax.split(fresh)
    opt = tx.init(trainable)
    for i, x in enumerate(xs):
        if i == 2:
            lorax.save(tmp_path, lorax.combine(trainable, frozen), state={"opt": opt, "step": i})
        trainable, opt = step(trainable, frozen, opt, x)

    template = {"opt": tx.init(lorax.split(fresh)[0]), "step": 0}  # the documented template
    back, state = lorax.load(tmp_path, params, state=template)
    count, mu = state["opt"][0].count, state["opt"][0].mu
    assert state["step"] == 2 and int(count) == 2
    assert count.sharding == NamedSharding(m, P())  # replicated over the params' mesh, not committed to device 0
    for like, x in zip(jax.tree.leaves(template["opt"]), jax.tree.leaves(state["opt"])):
        own = isinstance(like.sharding, NamedSharding)  # else replicated over the mesh like the count
        assert x.sharding == (like.sharding if own else NamedSharding(m, P())), (like.sharding, x.sharding)
    assert isinstance(mu["w1"].a.sharding, NamedSharding)
    resumed, resumed_frozen = lorax.split(back)
    for x in xs[2:]:
        resumed, state["opt"] = step(resumed, resumed_frozen, state["opt"], x)
    assert_trees_close(resumed, trainable, rtol=1e-6, atol=1e-7)
    assert_trees_close(state["opt"], opt, rtol=1e-6, atol=1e-7)


def test_restored_state_follows_the_template_then_the_params_mesh_else_stays_unplaced(tmp_path):
    m = mesh()
    on_mesh = sharded_params(m, P(None, "model"), P("model", None))
    lp = adapted(on_mesh)
    sharded = NamedSharding(m, P("model"))
    saved = {"moments": jax.device_put(jnp.arange(8.0), sharded), "count": jnp.int32(5),
             "host": np.arange(3.0), "step": 5, "rate": np.float32(0.5)}
    lorax.save(tmp_path, lp, state=saved)
    template = {"moments": jax.device_put(jnp.zeros(8), sharded), "count": jnp.int32(0),
                "host": np.zeros(3), "step": 0, "rate": np.float32(0.0)}
    _, state = lorax.load(tmp_path, on_mesh, state=template)
    assert state["moments"].sharding == sharded and state["count"].sharding == NamedSharding(m, P())
    assert isinstance(state["host"], np.ndarray) and type(state["step"]) is int and type(state["rate"]) is np.float32
    values = lambda tree: jax.tree.map(lambda v: np.asarray(v).tolist(), tree)  # noqa: E731
    assert values(state) == values(saved)

    _, state = lorax.load(tmp_path, jax.device_get(on_mesh), state=template)  # host params: no mesh
    assert state["moments"].sharding == sharded  # the template's sharding still rules
    assert not state["count"].committed  # free to join a computation on any device
    assert jax.jit(lambda c, v: c + v)(state["count"], jax.device_put(jnp.int32(1), jax.devices()[3])) == 6
