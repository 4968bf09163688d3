"""Atomic folder swaps: without ``renameat2`` the swap falls back to two renames and still completes."""

import types

import numpy as np
from helpers import QV_BASE as BASE
from helpers import qv_adapted as adapted
from helpers import qv_b as b_of

import lorax


def test_swap_without_renameat2_falls_back_to_two_renames(tmp_path, monkeypatch):
    from lorax._src.io import files

    monkeypatch.setattr(files.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())  # no renameat2
    lorax.save(tmp_path, adapted(0))
    lorax.save(tmp_path, adapted(1), step=0, overwrite=True)
    np.testing.assert_array_equal(b_of(lorax.load(tmp_path, BASE)), b_of(adapted(1)))
    assert {p.name for p in tmp_path.iterdir()} == {"0", ".lorax.lock"}
