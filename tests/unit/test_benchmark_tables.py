"""The SmolLM2 comparison table of `benchmarks/run.py` pairs each lorax run with the PEFT run it
is measured against, the memory options kept apart from the plain step."""

import importlib

import pytest
from helpers import ROOT


@pytest.fixture
def run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("run")


def _row(framework: str, base: str, s_per_step: float, rss: float, remat: str = "none", head_chunks: int = 0):
    return dict(framework=framework, kind="lora", targets="qv", base=base, remat=remat, head_chunks=head_chunks,
                batch=4, seq=128, s_per_step=s_per_step, s_per_step_runs=[s_per_step], tokens_per_s=512 / s_per_step,
                trained_params=460_800, train_peak_rss_mib=rss, step_gflop=290.0, matmul_peak_gflops=300.0,
                efficiency=0.5, first_step_s=3.0)


def test_the_memory_options_row_is_its_own_and_pairs_with_peft_s_plain_bf16_step(run):
    rows = [_row("lorax", "fp32", 1.8, 2000), _row("peft", "fp32", 1.2, 2200),
            _row("lorax", "bf16", 1.0, 1900), _row("peft", "bf16", 0.8, 1600),
            _row("lorax", "bf16", 0.9, 800, remat="full", head_chunks=8)]
    lines = "\n".join(run.smollm_markdown(dict(smollm=rows)))

    assert "| lorax | lora | qv | bf16 | remat full, head 8 | 4 × 128 | 0.90 |" in lines
    assert "| lorax | lora | qv | bf16 | – | 4 × 128 | 1.00 |" in lines
    assert "lorax / PEFT, lora qv (bf16): time 1.250, peak RSS 1.188" in lines
    assert "lorax / PEFT, lora qv (bf16; lorax with remat full, head 8): time 1.125, peak RSS 0.500" in lines
    assert "lorax / PEFT, lora qv (lorax bf16 against PEFT fp32): time 0.833, peak RSS 0.864" in lines
    assert "lorax / PEFT, lora qv (fp32): time 1.500, peak RSS 0.909" in lines


def test_the_options_a_run_reports_are_the_ones_its_command_line_passes(run):
    assert run.MEMORY_ARGV == ("--remat", "full", "--head-chunks", "8")
    assert run._options(run.MEMORY_OPTIONS) == "remat full, head 8"
    assert run._options(dict(remat="none", head_chunks=0)) == ""
    assert run._options(dict(remat="full", head_chunks=8, remat_groups=6)) == "remat full, head 8, 6 groups"
