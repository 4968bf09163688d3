"""The SmolLM2 comparison table of `benchmarks/run.py` pairs each lorax run with the PEFT run it
is measured against, the memory options and glibc's huge pages kept apart from the plain step; the
benchmarks' child processes get the huge-page tunable only when asked."""

import importlib

import pytest
from helpers import ROOT


def _benchmark(monkeypatch, name: str):
    """``benchmarks/<name>.py``, imported as the benchmarks import each other."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


@pytest.fixture
def run(monkeypatch):
    return _benchmark(monkeypatch, "run")


def _row(framework: str, base: str, s_per_step: float, rss: float, remat: str = "none", head_chunks: int = 0,
         huge_pages: bool = False):
    return dict(framework=framework, kind="lora", targets="qv", base=base, remat=remat, head_chunks=head_chunks,
                allocator="glibc-huge-pages" if huge_pages else "glibc",
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
    options = run._options(dict(remat="full", head_chunks=8, allocator="glibc-huge-pages"))
    assert options == "remat full, head 8, huge pages"
    assert run._options(dict(remat="none", head_chunks=0, allocator="tcmalloc")) == "tcmalloc"


@pytest.fixture
def processes(monkeypatch):
    return _benchmark(monkeypatch, "processes")


def test_the_huge_page_tunable_is_added_to_those_set_once_and_only_when_asked(processes, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert processes.examples_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    paged = processes.examples_env("glibc-huge-pages")
    assert paged["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert processes.allocator(paged) == "glibc-huge-pages" and processes.allocator(processes.examples_env()) == "glibc"
    monkeypatch.setenv("GLIBC_TUNABLES", paged["GLIBC_TUNABLES"])
    assert processes.examples_env("glibc-huge-pages")["GLIBC_TUNABLES"] == paged["GLIBC_TUNABLES"]  # not twice
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert processes.examples_env("glibc-huge-pages")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert processes.examples_env("glibc-huge-pages")["PYTHONPATH"].split(":")[0] == str(processes.EXAMPLES)


def test_tcmalloc_is_preloaded_after_what_is_preloaded_or_refused_by_name_where_missing(processes, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.setattr(processes, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    env = processes.examples_env("tcmalloc")
    assert env["LD_PRELOAD"] == "libother.so libtcmalloc_minimal.so.4" and processes.allocator(env) == "tcmalloc"
    monkeypatch.setattr(processes, "tcmalloc_library", lambda: None)
    with pytest.raises(FileNotFoundError, match="libtcmalloc-minimal4"):
        processes.examples_env("tcmalloc")
    with pytest.raises(ValueError, match="'jemalloc': expected one of"):
        processes.examples_env("jemalloc")


def test_the_kernel_s_huge_page_mode_is_the_bracketed_word_or_none(processes, monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(processes, "THP_SETTING", setting)
    assert processes.transparent_huge_pages() is None
    setting.write_text("always [madvise] never\n")
    assert processes.transparent_huge_pages() == "madvise"


@pytest.fixture
def allocators(monkeypatch):
    return _benchmark(monkeypatch, "allocators")


def test_the_allocator_table_compares_the_frameworks_under_each_and_each_at_its_fastest(allocators):
    times = {("lorax", "glibc"): 1.0, ("lorax", "glibc-huge-pages"): 0.8, ("lorax", "tcmalloc"): 0.9,
             ("peft", "glibc"): 1.6, ("peft", "glibc-huge-pages"): 2.0, ("peft", "tcmalloc"): 1.2}
    rows = [dict(framework=f, targets="qv", base="fp32", allocator=a, s_per_step=t, train_peak_rss_mib=1000 * t)
            for (f, a), t in times.items()]
    table = allocators.markdown(dict(machine="a CPU", transparent_huge_pages="madvise", rows=rows))

    assert "| qv | fp32 | lorax | 1.000 s, 1000 MiB | 0.800 s, 800 MiB | 0.900 s, 900 MiB |" in table
    assert "| qv | fp32 | 0.62 | 0.40 | 0.75 | 0.67 (lorax glibc-huge-pages, PEFT tcmalloc) |" in table
    assert "| all-linear |" not in table  # a configuration not measured gets no ratio row
    without = allocators.markdown(dict(machine="a CPU", transparent_huge_pages=None,
                                       rows=[r for r in rows if r["allocator"] != "tcmalloc"]))
    assert "| targets | base | glibc | glibc-huge-pages | each at its fastest |" in without


def test_the_allocator_run_refuses_empty_rounds_and_skips_a_missing_tcmalloc(allocators, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        allocators.main(["--rounds", "0"])
    assert "--rounds and --steps must be at least 1, not 0 and 8" in capsys.readouterr().err
    monkeypatch.setattr(allocators.processes, "tcmalloc_library", lambda: None)
    assert allocators.available() == ("glibc", "glibc-huge-pages")


def test_a_row_is_the_median_run_and_lists_every_run_in_order(processes):
    runs = [dict(s_per_step=1.2, argv=["a"]), dict(s_per_step=0.9, argv=["b"]), dict(s_per_step=1.0, argv=["c"])]
    assert processes.median_run(runs) == dict(s_per_step=1.0, argv=["c"], s_per_step_runs=[1.2, 0.9, 1.0])
    assert processes.median_run(runs[:2])["argv"] == ["b"]  # of two, the faster


def test_the_huge_page_runs_are_each_framework_s_plain_lora_steps_on_both_bases(run, monkeypatch):
    calls = []
    monkeypatch.setattr(run, "smollm_step", lambda argv, allocator: calls.append((argv, allocator)) or
                        dict(s_per_step=1.0))
    rows = run.smollm_runs(False, 1, dora=False, bf16=True, huge_pages=True)

    paged = [argv for argv, allocator in calls if allocator == "glibc-huge-pages"]
    assert len(calls) == len(rows) == 20 and {a for _, a in calls} == {"glibc", "glibc-huge-pages"}
    assert paged == [[f, "--targets", t, *base] for base in ([], ["--base", "bf16"]) for t in ("qv", "all-linear")
                     for f in ("lorax", "peft")]


def test_a_step_profile_shares_each_instant_among_the_instructions_running_then(monkeypatch):
    profile_step = _benchmark(monkeypatch, "profile_step")
    ms = 1_000_000  # ns
    events = [(0, 10 * ms, "gate"), (0, 10 * ms, "up"),  # side by side: 5 ms each
              (10 * ms, 16 * ms, "down"), (12 * ms, 14 * ms, "norm"),  # nested: down 4 + 1, norm 1
              (16 * ms, 16 * ms, "empty"),  # no length: no time, and it does not stay running
              (20 * ms, 22 * ms, "gate")]  # idle 16-20 ms counts for nothing

    shares = profile_step.wall_ms(events, steps=2)

    assert dict(shares) == pytest.approx(dict(gate=3.5, up=2.5, down=2.5, norm=0.5))
    assert sum(shares.values()) == pytest.approx((16 + 2) / 2)  # busy wall time per step, not thread time (15)


def test_a_step_profile_counts_the_flops_of_each_product_and_of_each_fusion_around_one(monkeypatch):
    profile_step = _benchmark(monkeypatch, "profile_step")
    hlo = """\
%fused_computation.2 (param_0: bf16[512,576], param_1: bf16[576,1536]) -> f32[512,1536] {
  %param_0 = bf16[512,576]{1,0} parameter(0)
  %param_1 = bf16[576,1536]{1,0} parameter(1)
  ROOT %dot_general.4 = f32[512,1536]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.3 (param_0.1: f32[512,1536]) -> f32[512] {
  %param_0.1 = f32[512,1536]{1,0} parameter(0)
  ROOT %reduce.1 = f32[512]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%add
}

ENTRY %main.5 (x: bf16[512,576], w: bf16[576,1536], q: f32[4,9,128,64], k: f32[4,9,128,64]) -> f32[512] {
  %x = bf16[512,576]{1,0} parameter(0)
  %w = bf16[576,1536]{1,0} parameter(1)
  %q = f32[4,9,128,64]{3,2,1,0} parameter(2)
  %k = f32[4,9,128,64]{3,2,1,0} parameter(3)
  %ynn_fusion = f32[512,1536]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.2
  %get-tuple-element.7 = f32[512,1536]{1,0} get-tuple-element(%while.1), index=2
  %dot.3 = f32[512,576]{1,0} dot(%get-tuple-element.7, %w), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %dot.96 = f32[4,9,128,128]{3,2,1,0} dot(%q, %k), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, \
rhs_batch_dims={0,1}, rhs_contracting_dims={3}
  ROOT %reduce_fusion = f32[512]{0} fusion(%ynn_fusion), kind=kInput, calls=%fused_computation.3
}
"""
    flops = profile_step.dot_flops(hlo)

    assert flops["ynn_fusion"] == flops["dot_general.4"] == 2 * 512 * 576 * 1536
    assert flops["dot.96"] == 2 * (4 * 9 * 128 * 128) * 64  # batch dims in the output, the contracted 64 once
    assert flops["dot.3"] == 2 * 512 * 576 * 1536  # an operand named with hyphens (a loop's tuple element)
    assert "reduce_fusion" not in flops and "reduce.1" not in flops  # no product, no rate
