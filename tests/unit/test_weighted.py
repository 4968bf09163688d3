"""`lorax.adapters.weighted` checks its arguments: weights, how, rank, sources and name, NumPy numbers
taken as numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BANK_BASE as BASE
from helpers import bank_member as one

import lorax
from lorax import adapters


@pytest.fixture(scope="module")
def bank():
    return adapters.bank({"code": one(1), "math": one(2, rank=3)})


def merged(params):
    return lorax.merge(params)["q_proj"]["kernel"]


@pytest.mark.parametrize("weights, error, message", [
    ([float("nan"), 1.0], ValueError, r"weights\[0\] must be a finite number, got nan"),
    ([1.0, float("inf")], ValueError, r"weights\[1\] must be a finite number, got inf"),
    ([1.0, "2"], TypeError, r"weights\[1\] must be a number, got '2' \(str\)"),
    ([True, 1.0], TypeError, r"weights\[0\] must be a number, got True \(bool\)"),
    ([1.0], ValueError, r"give distinct source names and one weight each; got \['code', 'math'\] and \[1.0\]"),
    (0.5, TypeError, r"weights must be a list \(one entry per source\), got 0.5 \(float\)"),
    ("12", TypeError, r"weights must be a list \(one entry per source\), got '12' \(str\)"),
])
def test_weighted_checks_weights(bank, weights, error, message):
    with pytest.raises(error, match=message):
        adapters.weighted(bank, "mix", ["code", "math"], weights, how="cat")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(how="mean"), ValueError, r"how must be one of \('cat', 'linear', 'ties', .*'magnitude_prune_svd'\), "
                                   r"got 'mean'"),
    (dict(how=["svd"]), ValueError, r"how must be one of .* got \['svd'\]"),
    (dict(how="svd", rank=0), ValueError, r"lorax.adapters.weighted: rank must be a positive int, got 0"),
    (dict(how="svd", rank=2.0), TypeError, r"rank must be a positive int, got 2.0 \(float\)"),
    (dict(how="svd", rank=True), TypeError, r"rank must be a positive int, got True \(bool\)"),
    (dict(how="cat", rank=2), ValueError, r"rank is the SVD's target rank \(how='svd' or '\*_svd'\); got rank=2 with "
                                          r"how='cat'"),
    (dict(how="ties"), ValueError, r"how='ties' needs density, the fraction of each tensor kept, in \(0, 1\]"),
    (dict(how="ties_svd", density=0.0), ValueError, r"density must be in \(0, 1\], got 0.0"),
    (dict(how="magnitude_prune", density=1.5), ValueError, r"density must be in \(0, 1\], got 1.5"),
    (dict(how="ties_svd", density="half"), TypeError, r"density must be a number, got 'half'"),
    (dict(how="ties_svd", density=0.5, majority_sign_method="max"), ValueError,
     r"majority_sign_method must be 'total' or 'frequency', got 'max'"),
    (dict(how="dare_linear_svd", density=0.5), ValueError, r"draws its drop from key: pass key=jax.random.key"),
    (dict(how="ties_svd", density=0.5, key=jax.random.key(0)), ValueError, r"is deterministic; key is for the dare"),
    (dict(how="dare_ties_svd", density=0.5, key=jax.random.PRNGKey(0)), TypeError,
     r"key must be one new-style PRNG key \(jax.random.key\)"),
    (dict(how="svd", density=0.5), ValueError, r"density and key are for the model-merging types"),
    (dict(how="ties", density=0.5), ValueError, r"how='ties' needs sources of one rank"),
    (dict(sources="code"), TypeError, r"sources must be a list \(one entry per source\), got 'code' \(str\)"),
    (dict(sources=["code", "code"]), ValueError, r"give distinct source names"),
    (dict(sources=[]), ValueError, r"give distinct source names"),
    (dict(name="code"), ValueError, r"the bank already holds an adapter 'code'"),
])
def test_weighted_checks_its_other_arguments(bank, kwargs, error, message):
    args = dict(name="mix", sources=["code", "math"], weights=[0.5, 0.5]) | kwargs
    with pytest.raises(error, match=message):
        adapters.weighted(bank, args.pop("name"), args.pop("sources"), args.pop("weights"), **args)


def test_weighted_takes_numpy_numbers(bank):
    want = adapters.weighted(bank, "mix", ["code", "math"], [0.5, -0.25], how="svd", rank=4)
    got = adapters.weighted(bank, "mix", ["code", "math"], np.array([0.5, -0.25], np.float32), how="svd",
                            rank=np.int64(4))
    also = adapters.weighted(bank, "mix", ("code", "math"), [np.float64(0.5), np.float32(-0.25)], how="svd",
                             rank=np.int32(4))
    for tree in (got, also):
        np.testing.assert_allclose(merged(adapters.select(tree, "mix")), merged(adapters.select(want, "mix")),
                                   rtol=1e-6)
    delta = merged(adapters.select(want, "mix")) - BASE["q_proj"]["kernel"]
    parts = [merged(adapters.select(bank, n)) - BASE["q_proj"]["kernel"] for n in ("code", "math")]
    np.testing.assert_allclose(delta, 0.5 * parts[0] - 0.25 * parts[1], atol=1e-5)  # rank 4 >= 2 + 3 - 1: exact


@pytest.fixture(scope="module")
def equal_ranks():
    return adapters.bank({"code": one(1, rank=2), "math": one(2, rank=2)})


def factors(params, name):
    a, b, _ = params["q_proj"]["kernel"].chosen(jnp.asarray(adapters.names(params).index(name)))
    return a, b


def test_dare_drops_each_entry_with_the_keys_draw_and_is_unbiased(equal_ranks):
    """DARE keeps each entry of each source with probability density and rescales it by
    1/density: a draw is reproducible from its key, and the mean over draws is the linear merge."""
    linear = factors(adapters.weighted(equal_ranks, "mix", ["code", "math"], [0.7, 0.5], how="linear"), "mix")[0]
    draw = lambda k, how="dare_linear": factors(adapters.weighted(  # noqa: E731
        equal_ranks, "mix", ["code", "math"], [0.7, 0.5], how=how, density=0.5, key=jax.random.key(k)), "mix")[0]
    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    draws = jnp.stack([draw(k) for k in range(200)])
    assert float(jnp.linalg.norm(draws[0] - linear) / jnp.linalg.norm(linear)) > 0.3  # one draw is far off
    assert float(jnp.linalg.norm(draws.mean(0) - linear) / jnp.linalg.norm(linear)) < 0.15
    dropped_by_both = float((draws == 0).mean())  # an entry is zero when both sources dropped it
    assert 0.2 < dropped_by_both < 0.3


def test_ties_elects_a_sign_and_averages_the_entries_that_agree():
    from lorax._src.banks.weighted import Merge, merged

    t = [jnp.array([3.0, -1.0, 2.0, 0.1]), jnp.array([-2.0, -3.0, 1.0, 0.2])]
    ties = merged(t, [1.0, 0.5], Merge("ties", 0.5, "total", None))
    # pruned: [3, 0, 2, 0] and [-2, -3, 0, 0]; signs by the sum: +, -, +, (0 -> +)
    np.testing.assert_allclose(ties, [3.0, -1.5, 2.0, 0.0])
    frequency = merged(t, [1.0, 1.0], Merge("ties", 1.0, "frequency", None))
    np.testing.assert_allclose(frequency, [3.0, -2.0, 1.5, 0.15])  # a tie of signs elects +: 3 alone
    pruned = merged(t, [1.0, 1.0], Merge("magnitude_prune", 0.25, "total", None))
    np.testing.assert_allclose(pruned, [3.0, -3.0, 0.0, 0.0])
