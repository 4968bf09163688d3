"""The SmolLM2 comparison table of `benchmarks/run.py` pairs each lorax run with the PEFT run it
is measured against, the memory options and glibc's huge pages kept apart from the plain step; the
benchmarks' child processes get the huge-page tunable only when asked."""

import importlib

import pytest
from helpers import ROOT


@pytest.fixture
def run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("run")


def _row(framework: str, base: str, s_per_step: float, rss: float, remat: str = "none", head_chunks: int = 0,
         huge_pages: bool = False):
    return dict(framework=framework, kind="lora", targets="qv", base=base, remat=remat, head_chunks=head_chunks,
                malloc_huge_pages=huge_pages,
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


def test_huge_page_runs_are_their_own_rows_and_pair_with_peft_s_runs_with_and_without_them(run):
    rows = [_row("lorax", "fp32", 1.0, 2000), _row("peft", "fp32", 1.6, 2200),
            _row("lorax", "fp32", 0.8, 2100, huge_pages=True), _row("peft", "fp32", 2.0, 2400, huge_pages=True)]
    lines = "\n".join(run.smollm_markdown(dict(smollm=rows)))

    assert "| lorax | lora | qv | fp32 | huge pages | 4 × 128 | 0.80 |" in lines
    assert "| peft | lora | qv | fp32 | – | 4 × 128 | 1.60 |" in lines
    assert "lorax / PEFT, lora qv (fp32): time 0.625, peak RSS 0.909" in lines
    assert "lorax / PEFT, lora qv (fp32; lorax with huge pages, PEFT with them): time 0.400, peak RSS 0.875" in lines
    assert "lorax / PEFT, lora qv (fp32; lorax with huge pages, PEFT without them): time 0.500, peak RSS 0.955" in lines
    assert run._options(dict(remat="full", head_chunks=8, malloc_huge_pages=True)) == "remat full, head 8, huge pages"


@pytest.fixture
def processes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("processes")


def test_the_huge_page_tunable_is_added_to_those_set_once_and_only_when_asked(processes, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert processes.examples_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    paged = processes.examples_env(huge_pages=True)
    assert paged["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert processes.huge_pages_on(paged) and not processes.huge_pages_on(processes.examples_env())
    monkeypatch.setenv("GLIBC_TUNABLES", paged["GLIBC_TUNABLES"])
    assert processes.examples_env(huge_pages=True)["GLIBC_TUNABLES"] == paged["GLIBC_TUNABLES"]  # not twice
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert processes.examples_env(huge_pages=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert processes.examples_env(huge_pages=True)["PYTHONPATH"].split(":")[0] == str(processes.EXAMPLES)


def test_the_kernel_s_huge_page_mode_is_the_bracketed_word_or_none(processes, monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(processes, "THP_SETTING", setting)
    assert processes.transparent_huge_pages() is None
    setting.write_text("always [madvise] never\n")
    assert processes.transparent_huge_pages() == "madvise"
