"""The paper-tables example: its subspace similarity on constructed matrices, its scene split, and a smoke run."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from paper_tables import singular_vectors, subspace_similarity  # noqa: E402


def orthonormal(d, k, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))[0]


def test_identical_subspaces_are_similar_everywhere():
    u = orthonormal(32, 8)
    assert np.allclose(subspace_similarity(u, u), 1.0)
    # the same span in another basis: only the full spans agree exactly
    rotated = u @ orthonormal(8, 8, seed=1)
    assert np.isclose(subspace_similarity(u, rotated)[7, 7], 1.0)


def test_orthogonal_subspaces_are_dissimilar_everywhere():
    q = orthonormal(32, 12)
    phi = subspace_similarity(q[:, :4], q[:, 4:])
    assert phi.shape == (4, 8) and np.allclose(phi, 0.0)


def test_partial_overlap_has_the_known_value():
    e = np.eye(16)
    u = e[:, [0, 1]]
    v = np.stack([e[:, 0], (e[:, 1] + e[:, 2]) / np.sqrt(2), e[:, 3]], axis=1)
    phi = subspace_similarity(u, v)
    # (i, j) = (1, 1): e0 in span(e0); (2, 2): (1 + 1/2) / 2; (2, 1): 1 / 1; (2, 3): (1 + 1/2) / 2
    assert np.allclose(phi, [[1.0, 1.0, 1.0], [1.0, 0.75, 0.75]])


def test_singular_vectors_span_the_factors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(24, 3)), rng.normal(size=(3, 20))
    u, v = singular_vectors(a @ b, 3)
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b.T)[0]
    assert np.isclose(subspace_similarity(u, qa)[2, 2], 1.0) and np.isclose(subspace_similarity(v, qb)[2, 2], 1.0)
