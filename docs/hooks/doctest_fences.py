"""A griffe extension for the API reference: render each docstring's ``>>>`` example as code.

lorax's docstrings carry doctests in their body (CI runs them), not under an ``Examples:``
heading; Markdown would read their ``>>>`` as nested block quotes. This wraps each run of
doctest lines (prompts, continuations and expected output) in a ``pycon`` fence.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each doctest in ``text`` in a fenced ``pycon`` block.

    >>> fence_doctests("Sum.\\n\\n>>> 1 + 1\\n2\\n\\nAfter.").splitlines()
    ['Sum.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'After.']
    """
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith(">>>") and not inside:
            out.append("```pycon")
            inside = True
        elif inside and not line.strip():
            out.append("```")
            inside = False
        out.append(line)
    if inside:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
