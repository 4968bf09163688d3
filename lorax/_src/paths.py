"""How lorax names a leaf of a parameter tree: its key path joined with "/"."""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lorax._src.trainable import is_node


def render(path: tuple) -> str:
    """Join a JAX key path with "/": ``params/h/attn/query/kernel``.

    Flax NNX's ``Variable.value`` step is dropped, so linen dicts, NNX ``State`` and
    equinox modules name the same weight alike.

    >>> import jax
    >>> [render(p) for p, _ in jax.tree_util.tree_flatten_with_path({"h": [1]})[0]]
    ['h/0']
    """
    parts = []
    for key in path:
        if isinstance(key, DictKey):
            parts.append(str(key.key))
        elif isinstance(key, GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if parts and isinstance(path[-1], GetAttrKey) and path[-1].name == "value":
        parts.pop()
    return "/".join(parts)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(name, leaf)`` for every leaf, lorax's nodes kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    return [(render(path), leaf) for path, leaf in flat]


def unique_named_leaves(tree: Any, who: str) -> list[tuple[str, Any]]:
    """`named_leaves`, refusing two leaves that render to one name (a key holding "/").

    >>> unique_named_leaves({"a/b": 1, "a": {"b": 2}}, "demo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: demo: the leaves ['a']['b'] and ['a/b'] are both named 'a/b'; ...
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    first: dict[str, tuple] = {}
    for path, _ in flat:
        other = first.setdefault(render(path), path)
        if other is not path:
            raise ValueError(f"{who}: the leaves {jax.tree_util.keystr(other)} and {jax.tree_util.keystr(path)} "
                             f"are both named {render(path)!r}; lorax names leaves by joining keys with '/', "
                             "so rename a key that holds '/'.")
    return [(render(path), leaf) for path, leaf in flat]


def regexes(value: Any, wrong_type: str, bad: str) -> tuple[re.Pattern, ...]:
    """``value``, a regex string or a list or tuple of them, compiled for matching paths. Any
    other value raises a TypeError with the message ``wrong_type``; a string that is not a
    regex, a ValueError that starts with ``bad`` and names it.

    >>> [p.pattern for p in regexes(["a.*", "b"], "no", "bad")]
    ['a.*', 'b']
    >>> regexes("(", "no", "lorax.quantize: targets")
    Traceback (most recent call last):
    ValueError: lorax.quantize: targets '(' is not a valid regex (missing ), unterminated subpattern at position 0).
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise TypeError(wrong_type)
    compiled = []
    for item in items:
        try:
            compiled.append(re.compile(item))
        except re.error as err:
            raise ValueError(f"{bad} {item!r} is not a valid regex ({err}).") from None
    return tuple(compiled)
