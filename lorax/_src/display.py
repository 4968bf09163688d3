"""How lorax's nodes and reports look: a plain ``repr``, treescope, and notebook tables.

A node is summarized, never dumped: each array field shows as ``f32[768,768] frozen`` or
``f32[768,8] trainable``, so printing a 135M-parameter tree stays a screenful. The nodes'
``__repr__`` and ``__treescope_repr__`` and `Explanation`'s ``_repr_markdown_`` and
``_repr_html_`` delegate here.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from treescope import renderers, rendering_parts

    from lorax._src.explain import Explanation

_DTYPE_PREFIXES = (("bfloat", "bf"), ("float", "f"), ("uint", "u"), ("int", "i"), ("complex", "c"))


def array_summary(x: Any, role: str) -> str:
    """``dtype[shape] role`` for an array-like (arrays, tracers, ``ShapeDtypeStruct``).

    >>> import jax.numpy as jnp
    >>> array_summary(jnp.zeros((768, 8), jnp.bfloat16), "trainable")
    'bf16[768,8] trainable'
    """
    if x is None or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return repr(x)
    name = str(x.dtype)
    for long, short in _DTYPE_PREFIXES:
        if name.startswith(long):
            name = short + name[len(long):]
            break
    return f"{name}[{','.join(map(str, x.shape))}] {role}"


class _Summary:
    """A field's summary, rendered by treescope as plain text (not as a quoted string)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> rendering_parts.Rendering:
        from treescope import rendering_parts

        return rendering_parts.build_one_line_tree_node(rendering_parts.text(self.text), path)


def _fields(node: Any, frozen: Sequence[str], skip: Sequence[str] = ()) -> dict[str, Any]:
    """The node's fields, array fields (first) replaced by their summaries, defaults of the
    static ones left out."""
    out: dict[str, Any] = {}
    held = node.layout() if hasattr(node, "layout") else {}
    for field in sorted(dataclasses.fields(node), key=lambda f: bool(f.metadata.get("static"))):
        value = getattr(node, field.name)
        if field.name in skip or (value is None and field.metadata.get("role") == "trained" and field.name not in held):
            continue  # an optional array this node does not hold (LoKr's full or factored blocks)
        if field.metadata.get("static"):
            if value != field.default:
                out[field.name] = value
        else:
            role = "shared" if field.metadata.get("shared") else "frozen" if field.name in frozen else "trainable"
            out[field.name] = _Summary(array_summary(value, role)) if value is not None else None
    return out


def _headline(node: Any, kind: str) -> str:
    rank = getattr(node, "rank", None)  # None also when the factors are absent (a split's frozen half)
    parts = [kind] + ([f"rank={rank}"] if rank else [])  # 0: a kind without a rank (IA³)
    scales = getattr(node, "scales", None)  # a bank: each adapter's own scale, not the unused `scale`
    if scales is not None:
        try:
            parts.append("scales=" + ",".join(f"{float(v):g}" for v in np.asarray(scales).ravel()))
        except (TypeError, jax.errors.TracerArrayConversionError):  # traced, or abstract
            parts.append(f"scales={array_summary(scales, 'frozen')}")
    elif hasattr(node, "scale"):
        parts.append(f"scale={node.scale:g}")
    return " ".join(parts)


def node_repr(node: Any, kind: str, frozen: Sequence[str] = ()) -> str:
    """One line: the class, its kind, rank and scale, then each field (arrays summarized).

    ``frozen`` names the array fields that are not trained; the others are ``trainable``. A
    frozen array many nodes hold (a `shared_field`) shows as ``shared``.

    >>> import jax.numpy as jnp, lorax
    >>> lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=0.5)
    LoraWeight(lora rank=2 scale=0.5, w=f32[4,3] frozen, a=f32[4,2] trainable, b=f32[2,3] trainable)
    """
    fields = ", ".join(f"{name}={value!r}" for name, value in _fields(node, frozen, skip=("scale",)).items())
    return f"{type(node).__name__}({_headline(node, kind)}, {fields})"


def node_treescope(node: Any, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer,
                   kind: str, frozen: Sequence[str] = ()) -> rendering_parts.Rendering:
    """A foldable treescope node: the headline as a comment, then each field (arrays summarized)."""
    from treescope import rendering_parts, repr_lib

    rendering = repr_lib.render_object_constructor(type(node), _fields(node, frozen), path, subtree_renderer)
    comment = rendering_parts.comment_color(rendering_parts.text(f"  # {_headline(node, kind)}"))
    return rendering_parts.siblings_with_annotations(rendering, extra_annotations=[comment])


def explanation_cells(report: Explanation) -> tuple[list[str], list[list[str]], str]:
    head = ["path", "shape", "kind", "rank", "scale", "params", "computed"]
    body = [[r.path, "x".join(map(str, r.shape)), r.kind, str(r.rank), f"{r.scale:g}", f"{r.params:,}", r.how]
            for r in report.rows]
    foot = f"trainable {report.trainable:,} of {report.total:,} parameters ({100 * report.share:.4f}%)"
    return head, body, foot


def explanation_markdown(report: Explanation) -> str:
    """`lorax.explain`'s report as a Markdown table, one row per adapted weight."""
    head, body, foot = explanation_cells(report)
    row = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([row(head), row(["---"] * len(head)), *map(row, body), "", foot])


def explanation_html(report: Explanation) -> str:
    """`lorax.explain`'s report as an HTML table, one row per adapted weight."""
    head, body, foot = explanation_cells(report)
    row = lambda tag, cells: "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"  # noqa: E731
    rows = "".join(row("td", cells) for cells in body)
    return f"<table><thead>{row('th', head)}</thead><tbody>{rows}</tbody></table><p>{html.escape(foot)}</p>"
