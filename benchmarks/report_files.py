"""One section's results on disk: its table printed and written as Markdown, its numbers as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def written(out: Path, name: str, report, table: str):
    """Print ``table`` and write it and ``report`` to ``out/name.md`` and ``out/name.json``;
    returns ``report``."""
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    print(f"\nwrote {out}/{name}.json, {name}.md")
    return report
