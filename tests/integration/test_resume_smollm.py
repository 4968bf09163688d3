"""Resuming the main job (examples/finetune_smollm.py): a run stopped by SIGTERM and resumed with --resume
continues from the saved step to --steps and ends in the uninterrupted run's model and loss history."""

import functools
import hashlib
import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import require_smollm

require_smollm()

import finetune_smollm  # noqa: E402
import tqdm  # noqa: E402
from lorax_examples import smollm  # noqa: E402

import lorax  # noqa: E402

TINY = ["--steps", "4", "--seq", "16", "--batch", "1", "--eval-batches", "1", "--eval-every", "2",
        "--new-tokens", "1"]


@pytest.fixture(scope="module", autouse=True)
def model_and_tokens_read_once():
    """Each run reads the same GGUF file and tokenizes the same texts; do both once for the module."""
    load, splits = smollm.load, finetune_smollm.token_splits
    smollm.load = functools.cache(load)
    tokens = {}

    def token_splits_once(tokenizer, texts):  # the same tokenizer (the load is cached) and texts each time
        if id(tokenizer) not in tokens:
            tokens[id(tokenizer)] = splits(tokenizer, texts)
        return tokens[id(tokenizer)]

    finetune_smollm.token_splits = token_splits_once
    yield
    smollm.load, finetune_smollm.token_splits = load, splits


def progress_bars(monkeypatch, sigterm_at=None):
    """The runs' progress bars, recorded; with ``sigterm_at``, SIGTERM arrives as that step starts."""
    bars = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def __iter__(self):
            for step in super().__iter__():
                if step == sigterm_at:
                    signal.raise_signal(signal.SIGTERM)
                yield step

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    return bars


def history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def adapters(out: Path) -> list[np.ndarray]:
    _, base, _ = smollm.load(base="fp32")
    return [np.asarray(x) for x in jax.tree.leaves(lorax.split(lorax.load(out / "adapter", base))[0])]


def steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "adapter").iterdir() if p.name.isdigit())


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_model_and_losses(tmp_path, monkeypatch, capsys):
    reference, run = tmp_path / "reference", tmp_path / "run"
    expected = finetune_smollm.main([*TINY, "--out", str(reference)])

    progress_bars(monkeypatch, sigterm_at=2)
    assert finetune_smollm.main([*TINY, "--out", str(run)]) == {"preempted_at": 2}
    assert len(history(run)["losses"]) == 2 and steps(run) == [2]

    bars = progress_bars(monkeypatch)
    capsys.readouterr()
    resumed = finetune_smollm.main([*TINY, "--out", str(run), "--resume"])
    assert "resumed at step 2 of 4" in capsys.readouterr().out
    assert [(bar.initial, bar.n, bar.total) for bar in bars] == [(2, 4, 4)]  # steps 3 and 4 only
    assert steps(run) == [2, 4]  # not step 6
    np.testing.assert_allclose(history(run)["losses"], history(reference)["losses"], rtol=1e-6)
    assert [s for s, _ in resumed["held_out"]] == [s for s, _ in expected["held_out"]] == [0, 2, 4]
    np.testing.assert_allclose([v for _, v in resumed["held_out"]], [v for _, v in expected["held_out"]], rtol=1e-6)
    for got, want in zip(adapters(run), adapters(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    before = folder_hash(run)
    with pytest.raises(SystemExit) as exit_info:
        finetune_smollm.main([*TINY, "--out", str(run), "--resume", "--steps", "3"])
    assert exit_info.value.code == 2
    assert "the checkpoint in" in capsys.readouterr().err and folder_hash(run) == before
