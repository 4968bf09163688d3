"""`lorax.adapters.weighted` checks its arguments: weights, how, rank, sources and name, NumPy numbers
taken as numbers."""

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
    (dict(how="mean"), ValueError, r"how must be one of \('linear', 'cat', 'svd'\), got 'mean'"),
    (dict(how=["svd"]), ValueError, r"how must be one of .* got \['svd'\]"),
    (dict(how="svd", rank=0), ValueError, r"lorax.adapters.weighted: rank must be a positive int, got 0"),
    (dict(how="svd", rank=2.0), TypeError, r"rank must be a positive int, got 2.0 \(float\)"),
    (dict(how="svd", rank=True), TypeError, r"rank must be a positive int, got True \(bool\)"),
    (dict(how="cat", rank=2), ValueError, r"rank is the SVD's target rank \(how='svd'\); got rank=2 with how='cat'"),
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
