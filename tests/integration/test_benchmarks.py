"""The benchmark command runs end to end (`--smoke`: `--quick` at each section's smallest
configuration, SmolLM2 cut to its first two decoder layers); its numbers are checked where
deterministic."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

LAYERS = 2  # SmolLM2's first decoder layers, as --smoke keeps them
FLOOR = "frozen model, input gradient only (LoRA's floor)"  # a wall-table row the sweeps do not have


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if os.environ.get("CI") != "true":  # in CI the PEFT comparison must run, not skip
        pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)]
    # the smoke checks what the run reports, not its speed: it compiles with the tests' fast XLA flags
    env = subprocess_env(XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=2400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "benchmark.json").read_text()), done.stdout


def test_quick_run_writes_table_json_and_chart(quick):
    out, report, stdout = quick
    assert "| LoRA all-linear |" in stdout and "lorax / PEFT, lora qv (fp32): time" in stdout
    assert "lorax / PEFT, dora qv (fp32): time" in stdout and "DoRA / LoRA, all-linear step time" in stdout
    assert (out / "performance.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "benchmark.md").read_text().strip() in stdout


def test_quick_run_reports_every_section(quick):
    _, report, _ = quick
    variants = {r["variant"] for r in report["wall"]}
    assert {"full fine-tuning", "LoRA q,v", "LoRA all-linear", "materialized LoRA all-linear",
            "DoRA all-linear"} <= variants
    assert all(r["s_per_step"] > 0 for r in report["wall"])
    assert {r["framework"] for r in report["smollm"]} == {"lorax", "peft"}
    assert {r["rank"] for r in report["ranks"]} == {1}
    assert {r["seq"] for r in report["seqs"]} == {report["widths"]["seq"]}  # the wall table's, reused
    assert {r["variant"] for r in report["seqs"]} == {r["variant"] for r in report["wall"]} - {FLOOR}
    assert {r["variant"] for r in report["serving"]} == {"base", "one adapter", "mixed", "8 sequential calls"}
    assert {"base", "all-linear r=8", "bank of 2, one adapter r=8"} <= {r["variant"] for r in report["overhead"]}
    assert [r["runtime"] for r in report["decode"]] == ["lorax-cache", "lorax-recompute", "transformers"]
    kinds = {r["kind"]: r for r in report["kinds"]}
    assert list(kinds) == ["lora", "dora", "ia3", "loha", "lokr", "oft", "vera"] and kinds["lora"]["time_over_lora"] > 0
    assert kinds["ia3"]["trainable"] < kinds["lora"]["trainable"] < kinds["loha"]["trainable"]
    assert all(r["temp_over_lora"] < 2 for r in report["kinds"])  # no kind holds a weight-sized array per layer
    assert all(r["decode_tokens_per_s"] > 0 and r["new"] == 8 for r in report["decode"])


def test_quick_run_prints_the_roofline_and_efficiencies(quick):
    _, report, stdout = quick
    assert "**Roofline**" in stdout and report["roofline"]["jax"]["peak"] > 0
    for row in report["wall"] + report["smollm"]:
        gflops = row.get("gflops_per_s", row.get("step_gflop", 0) / row["s_per_step"])
        assert gflops > 0 and row["s_per_step"] > 0
    for row in report["smollm"]:  # a share of the machine's own matmul rate, in the same process
        assert 0 < row["efficiency"] < 1.5 and row["machine"]["cores"] >= 1
        assert row["first_step_s"] > 0 and (row["compile_s"] is None) == (row["framework"] == "peft")
        if row["framework"] == "lorax":  # JAX's first step includes tracing and compiling the step
            assert row["first_step_s"] > row["compile_s"] > 0
    lorax_qv, peft_qv = ({r["framework"]: r for r in report["smollm"] if r["kind"] == "lora"}[f]
                         for f in ("lorax", "peft"))
    # the same model and step counted two ways (jaxpr matmuls; torch's flop counter) agree
    assert lorax_qv["step_gflop"] == pytest.approx(peft_qv["step_gflop"], rel=0.05)


def test_deterministic_measures_hold_in_the_quick_run(quick):
    _, report, _ = quick
    flops = {r["variant"]: r["flops_over_full"] for r in report["compiled"]}
    assert flops["LoRA q,v"] < flops["LoRA all-linear"] < 0.8 < 1.0 <= flops["materialized LoRA all-linear"]
    assert flops["LoRA all-linear"] < flops["DoRA all-linear"] < 0.8  # DoRA stays factored
    inference = {r["variant"]: r["flops_over_base"] for r in report["inference"]}
    assert inference["merged"] == 1.0 and 1.0 < inference["unmerged"] < 1.1
    # lorax and PEFT train the same adapters and write the same tensors; lorax's header adds the base's fingerprint
    assert {r["layers"] for r in report["smollm"] + report["smollm_qlora"] + report["decode"]} == {LAYERS}
    # the QLoRA rows compare the fp32 base, the LoRA q,v run of the same shape (reused), with the Q4_1 blocks
    lorax_qv = next(r for r in report["smollm"] if r["framework"] == "lorax" and r["kind"] == "lora")
    assert report["smollm_qlora"][0] == lorax_qv and report["smollm_qlora"][1]["base"] == "q4"
    per_layer = {"lora": 15_360, "dora": 15_360 + 576 + 192}  # q: 8·(576+576), v: 8·(576+192); DoRA: + m
    for kind, count in ((kind, LAYERS * n) for kind, n in per_layer.items()):
        lorax_run, peft_run = sorted((r for r in report["smollm"] if r["kind"] == kind), key=lambda r: r["framework"])
        assert lorax_run["trained_params"] == peft_run["trained_params"] == count
        assert lorax_run["adapter_tensor_bytes"] == peft_run["adapter_tensor_bytes"] == 4 * count
        assert peft_run["adapter_bytes"] < lorax_run["adapter_bytes"] < 1.02 * peft_run["adapter_bytes"]
        assert abs(lorax_run["first_loss"] - peft_run["first_loss"]) < 1e-3 * abs(peft_run["first_loss"])


def test_memory_table_holds_each_base_and_the_lora_bounds(quick):
    _, report, stdout = quick
    assert "**Train-step memory, SmolLM2-135M" in stdout
    rows = {(r["variant"], r["base"]): r for r in report["memory"]}
    assert set(rows) == {(v, b) for v in ("full", "hand", "lorax") for b in ("fp32", "bf16")} | {("lorax", "q4")}
    assert {r["layers"] for r in report["memory"]} == {LAYERS}
    for base in ("fp32", "bf16"):  # lorax's step holds what LoRA written by hand holds, less than full fine-tuning
        full, hand, lorax_step = (rows[v, base] for v in ("full", "hand", "lorax"))
        assert lorax_step["arguments_mib"] == hand["arguments_mib"] < full["arguments_mib"]
        assert lorax_step["temporaries_mib"] <= min(1.05 * hand["temporaries_mib"], full["temporaries_mib"])
    # the base's bytes among the arguments: the 4-bit blocks below bf16, bf16 below fp32
    arguments = [rows["lorax", base]["arguments_mib"] for base in ("q4", "bf16", "fp32")]
    assert arguments == sorted(arguments) and len(set(arguments)) == 3


@pytest.mark.parametrize("framework", ["lorax", "peft"])
def test_step_profile_classes_each_framework_s_time(framework):
    if framework == "peft" and os.environ.get("CI") != "true":
        pytest.importorskip("peft")
    command = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), framework, "--layers", str(LAYERS),
               "--warmup", "1", "--profiled", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    classes = row["ms_per_step"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from profile_step import CLASSES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert row["framework"] == framework and set(classes) <= set(CLASSES)
    # the frozen projections are found and timed, and the low-rank factors are a small part of them
    assert 0 < classes["low-rank factors"] < classes["projections"]


def test_in_process_ab_times_both_settings_of_one_step_and_refuses_a_torch_one(tmp_path):
    """Two settings that compute the same step (causal attention in 1 and in 4 query blocks)
    start from the same loss; each pair times both; a torch framework cannot share the process."""
    script = str(ROOT / "benchmarks" / "in_process_ab.py")
    command = [sys.executable, script, "lorax", "--layers", str(LAYERS), "--warmup", "1", "--pairs", "3",
               "--a=--attention-blocks=1", "--b=--attention-blocks=4", "--out", str(tmp_path), "--name", "ab"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ab.json").read_text())
    assert [len(report["times"][n]) for n in ("A", "B")] == [3, 3] and report["b_over_a_median"] > 0
    assert abs(report["first_losses"]["A"][0] - report["first_losses"]["B"][0]) < 1e-4
    assert "B / A" in (tmp_path / "ab.md").read_text()
    refused = subprocess.run([*command[:2], "peft", *command[3:]], capture_output=True, text=True, cwd=ROOT,
                             timeout=120, env=subprocess_env())
    assert refused.returncode == 2 and "a JAX framework" in refused.stderr
