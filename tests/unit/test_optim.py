"""Training through `lorax.optimizer` and `split`: frozen means frozen (no change, no gradient work, no
optimizer state)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import KEY, make_case

import lorax


def _bits(tree):
    return [np.asarray(x).view(np.uint32).copy() for x in jax.tree.leaves(tree)]


def _setup():
    fn, params, x = make_case("mlp")
    # a negative zero in a frozen weight must survive too
    params["params"]["Dense_0"]["kernel"] = params["params"]["Dense_0"]["kernel"].at[0, 0].set(-0.0)
    lp = lorax.init(KEY, lorax.LoraConfig(rank=2, targets=r".*Dense_[01]/kernel",
                                          trainable=r".*Dense_2/bias"), fn, params, x)
    y = jnp.sin(x[:, :8])
    loss = lambda p: jnp.mean((lorax.lora(fn)(p, x) - y) ** 2)  # noqa: E731
    return lp, loss


def test_optimizer_over_whole_tree_trains_adapters_only():
    lp, loss = _setup()
    frozen_before = _bits(lorax.split(lp)[1])
    tx = lorax.optimizer(optax.adam(1e-2))
    state = tx.init(lp)
    # Adam's state: a count plus two moments for each a, b and the Trainable bias only
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(lorax.split(lp)[0]))
    state_shapes = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim)
    assert state_shapes == sorted(adapter_shapes * 2)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    first = None
    for _ in range(60):
        lp, state, value = step(lp, state)
        first = first if first is not None else value
    assert value < 0.5 * first
    after = lorax.split(lp)[1]
    for b, a in zip(frozen_before, _bits(after)):
        np.testing.assert_array_equal(b, a)
    assert np.signbit(after["params"]["Dense_0"]["kernel"].w[0, 0])


def test_split_path_trains_adapters_and_returns_only_them():
    lp, loss = _setup()
    trainable, frozen = lorax.split(lp)
    frozen_before = _bits(frozen)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(t, s, f):
        value, g = jax.value_and_grad(lambda t: loss(lorax.combine(t, f)))(t)
        updates, s = tx.update(g, s, t)
        return optax.apply_updates(t, updates), s, value

    values = []
    for _ in range(60):
        trainable, state, value = step(trainable, state, frozen)
        values.append(value)
    assert values[-1] < 0.5 * values[0]
    for b, a in zip(frozen_before, _bits(frozen)):
        np.testing.assert_array_equal(b, a)
    assert isinstance(trainable["params"]["Dense_2"]["bias"], lorax.Trainable)


def test_whole_tree_gradient_of_w_is_zero_and_costs_no_matmul():
    lp, loss = _setup()
    g = jax.grad(loss)(lp)
    assert not np.any(np.asarray(g["params"]["Dense_0"]["kernel"].w))
    w_sized = re.compile(r"f32\[(10,16|16,10)\] = dot_general")
    assert not w_sized.search(str(jax.make_jaxpr(jax.grad(loss))(lp)))  # no W-sized matmul
    fn, _, x = make_case("mlp")
    full = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(fn(p, x))))(lorax.merge(lp))
    assert w_sized.search(str(full))  # ... while full fine-tuning has one
