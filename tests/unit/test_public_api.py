"""The public API is pinned: `lorax.__all__`, sorted, names exactly these."""

import lorax


def test_public_api_is_pinned():
    assert lorax.__all__ == sorted(lorax.__all__)
    assert lorax.__all__ == ["Adapter", "DoraWeight", "Explanation", "LoraBank", "LoraConfig", "LoraWeight",
                             "QuantizedArray", "Trainable", "adapters", "combine", "explain", "gguf_tensor", "init",
                             "load", "lora", "merge", "merge_quantized", "optimizer", "partition_specs", "quantize",
                             "save", "split", "unmerge"]
