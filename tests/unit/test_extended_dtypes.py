"""Typed PRNG keys (and other extended dtypes) in the params pass through every entry point
untouched: an NNX state that holds its ``Rngs`` is adapted, trained, saved and merged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorax


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(6, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.down = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.down(self.drop(jax.nn.relu(self.up(x))))


X = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)


def nnx_case(dtype=jnp.float32):
    model = Net(nnx.Rngs(0))
    model.eval()                                              # dropout off: outputs are comparable
    graphdef, state = nnx.split(model)                        # one State: weights and the Rngs' keys
    state = jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, state)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    return forward, state


def keys_of(tree):
    return [x for x in jax.tree.leaves(tree) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_state_with_its_rngs_goes_through_every_entry_point(tmp_path, dtype):
    forward, state = nnx_case(dtype)
    assert keys_of(state), "the state should hold the Rngs' keys"
    params = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2), forward, state, X)
    params = jax.tree.map(lambda n: n.replace(b=jnp.full_like(n.b, 0.1)) if isinstance(n, lorax.LoraWeight) else n,
                          params, is_leaf=lambda n: isinstance(n, lorax.LoraWeight))
    explanation = lorax.explain(forward, params, X)
    assert sorted(r.path for r in explanation.rows if r.rank) == ["down/kernel", "up/kernel"]

    out = lorax.lora(forward)(params, X)
    ref = forward(lorax.merge(params), X)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)

    trainable, frozen = lorax.split(params)
    assert keys_of(frozen) and not keys_of(trainable)
    tx = lorax.optimizer(optax.adam(1e-2))
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss = lambda t: jnp.mean(lorax.lora(forward)(lorax.combine(t, frozen), X).astype(jnp.float32) ** 2)
        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    trainable, opt_state = step(trainable, opt_state)
    params = lorax.combine(trainable, frozen)
    for before, after in zip(keys_of(state), keys_of(params)):
        np.testing.assert_array_equal(jax.random.key_data(before), jax.random.key_data(after))

    merged = lorax.merge(params)
    np.testing.assert_array_equal(jax.random.key_data(keys_of(merged)[0]), jax.random.key_data(keys_of(state)[0]))
    assert jax.tree.structure(lorax.unmerge(merged, trainable)) == jax.tree.structure(params)
    assert jax.tree.structure(lorax.partition_specs(params)) == jax.tree.structure(params)

    lorax.save(tmp_path / "ckpt", params, step=1)
    back = lorax.load(tmp_path / "ckpt", state)
    np.testing.assert_array_equal(np.asarray(lorax.lora(forward)(back, X), np.float32),
                                  np.asarray(lorax.lora(forward)(params, X), np.float32))
    bank = lorax.adapters.bank({"one": params, "two": back})
    assert lorax.adapters.names(bank) == ("one", "two")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_a_plain_tree_with_a_key_leaf_is_adapted_and_differentiated(dtype):
    fn = lambda p, x: x @ p["w"]
    x = jnp.ones((1, 4), dtype)
    params = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn,
                        {"w": jnp.ones((4, 3), dtype), "rng": jax.random.key(0)}, x)
    trainable, frozen = lorax.split(params)
    loss = lambda t: lorax.lora(fn)(lorax.combine(t, frozen), x).sum().astype(jnp.float32)
    assert jax.grad(loss)(trainable)["w"].b.shape == (2, 3)
    assert lorax.explain(fn, params, x).rows


def test_explain_counts_floating_weights_only_not_rng_keys_or_counters():
    forward, state = nnx_case()
    params = lorax.init(jax.random.key(1), lorax.LoraConfig(rank=2), forward, state, X)
    floats = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    explanation = lorax.explain(forward, params, X)
    assert explanation.trainable == 2 * (6 + 8) + 2 * (8 + 3)
    assert explanation.total == floats + explanation.trainable  # the base weights and the adapters
