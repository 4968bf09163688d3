"""The README's and the documentation site's code, and the quickstart example, run exactly as written.

Every ```python block of a page runs, in order, in one namespace per page. Code that must not
run here (a long job, a downloaded model) goes in a ```bash block.
"""

import re
import runpy
import sys

import pytest
from helpers import ROOT

import lorax

PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))


def run_python_blocks(page: str) -> dict:
    """Execute the page's ```python blocks in order; returns their namespace."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), re.S | re.M)
    namespace: dict = {"__name__": page}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{page} block {index}", "exec"), namespace)
    namespace["_blocks"] = len(blocks)
    return namespace


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_readme_python_blocks_run_in_order(at_root):
    namespace = run_python_blocks("README.md")
    assert namespace["_blocks"] == 3
    assert namespace["merged"]["params"]["layers_0"]["kernel"].shape == (16, 64)
    assert isinstance(namespace["qparams"]["params"]["layers_0"]["kernel"].w, lorax.QuantizedArray)
    assert namespace["out"].shape == (4, 8)
    assert namespace["logits"].shape == (4, 8)  # four examples, three adapters and the base


@pytest.mark.parametrize("page", PAGES)
def test_docs_python_blocks_run_in_order(page, at_root):
    run_python_blocks(page)


def test_every_page_with_code_runs_some(at_root):
    """The guides are the pages users copy from: each must carry executed Python."""
    counted = {page: len(re.findall(r"^```python\n", (ROOT / page).read_text(), re.M)) for page in PAGES}
    guides = [page for page in PAGES if page.startswith("docs/guides/")]
    assert len(guides) == 4 and all(counted[page] >= 2 for page in guides), counted


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    missing = [page for page in PAGES if page not in linked]
    assert not missing, f"README.md does not link {missing}"
    assert all((ROOT / page).exists() for page in linked), linked


def test_quickstart_example_learns_and_merges(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out.split("LoRA fine-tuning")[1])]
    assert losses[-1] < 0.05 * losses[0]
    assert float(re.search(r"max \|difference\| = ([0-9.e+-]+)", out).group(1)) < 1e-4
    assert "bit-identical after training: True" in out
