"""The README's code and the quickstart example run exactly as written."""

import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run_in_order(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md block {index}", "exec"), namespace)
    assert namespace["again"]["params"]["layers"]["mlp"]["up_proj"]["kernel"].rank == 8


def test_quickstart_example_learns_and_merges(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out.split("LoRA fine-tuning")[1])]
    assert losses[-1] < 0.05 * losses[0]
    assert float(re.search(r"max \|difference\| = ([0-9.e+-]+)", out).group(1)) < 1e-4
    assert "bit-identical after training: True" in out
