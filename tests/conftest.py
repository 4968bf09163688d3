"""Fixtures shared by the unit and integration tests (the run's set-up is in the root conftest.py)."""

import jax
import numpy as np
import pytest


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5):
    """Compare two pytrees leaf by leaf, naming the first leaf that differs.

    ``atol`` is relative to each leaf's largest magnitude (at least 1)."""
    a_leaves, a_tree = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    assert a_tree == e_tree, f"structures differ:\n{a_tree}\n{e_tree}"
    for (path, a), e in zip(a_leaves, e_leaves):
        e = np.asarray(e, np.float64)
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def trees_close():
    return assert_trees_close
