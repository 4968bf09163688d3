"""The public API is pinned: `lorax.__all__` and `lorax.extend.__all__`, sorted, name exactly these."""

import lorax
import lorax.extend


def test_public_api_is_pinned():
    assert lorax.__all__ == sorted(lorax.__all__)
    assert lorax.__all__ == ["ALL_LINEAR", "Adapter", "Bf16Bits", "DoraWeight", "Explanation", "Ia3Weight",
                             "LohaWeight", "LokrWeight", "LoraBank", "LoraConfig", "LoraWeight", "OftWeight",
                             "QuantizedArray", "Row", "Targets", "Trainable", "VeraWeight", "adapters", "combine",
                             "explain", "gguf_tensor", "init", "load", "lora", "merge", "merge_quantized",
                             "optimizer", "partition_specs", "quantize", "save", "split", "unmerge"]


def test_extension_api_is_pinned():
    assert lorax.extend.__all__ == sorted(lorax.extend.__all__)
    assert lorax.extend.__all__ == ["ADAPTERS", "Adapter", "Additive", "DotMatrices", "DotParts", "KINDS",
                                    "LowRank", "PeftFormat", "RANK", "RULES", "Rule", "Tracked", "apply", "bind",
                                    "dense", "dot_matrices", "dot_parts", "factors_dot", "frozen_field", "is_tracked",
                                    "register_kind", "rule", "shared_field", "static_field", "trained_field",
                                    "view_base"]
    assert lorax.extend.Adapter is lorax.Adapter


def test_one_version_everywhere():
    """The package, the checkpoints' record, the site's title and its home page name one version."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert lorax.__version__ == version
    assert f"site_name: lorax {version}\n" in (root / "mkdocs.yml").read_text()
    assert f"Version {version} (" in (root / "docs" / "index.md").read_text()
