"""`LoraConfig`: which weights to adapt and how."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Literal, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lorax._src.records import index, real

Targets = str | Sequence[str] | Callable[[str, Any], bool]

ALL_LINEAR = "all-linear"


def _patterns(value: str | Sequence[str] | None, field: str) -> tuple[re.Pattern, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        extra = ", 'all-linear' or a predicate (path, leaf) -> bool" if field == "targets" else ""
        raise TypeError(f"LoraConfig.{field}: expected a regex string or a list of them{extra}, got {value!r}.")
    compiled = []
    for item in items:
        try:
            compiled.append(re.compile(item))
        except re.error as err:
            raise ValueError(f"LoraConfig.{field}: {item!r} is not a valid regex ({err}).") from None
    return tuple(compiled)


def first_match(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value of the first ``{regex: value}`` entry that fully matches ``path``."""
    for pattern, value in patterns.items():
        if re.fullmatch(pattern, path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What `lorax.init` adapts and how.

    Args:
      rank: the rank r of every adapter (``rank_pattern`` overrides per weight).
      alpha: scale numerator; the scale is ``alpha / rank`` (``alpha / sqrt(rank)`` with
        ``use_rslora``). Default: the rank, so the scale is 1.
      targets: ``"all-linear"`` (every weight used by a matmul, einsum or convolution,
        except embedding tables and a head tied to them), a regex or list of regexes
        fully matched against the parameter path (``"h/attn/query/kernel"``), or a
        predicate ``(path, leaf) -> bool``.
      exclude: regexes of paths never adapted.
      rank_pattern, alpha_pattern: ``{regex: value}``; the first full match wins.
      use_rslora: scale by ``alpha / sqrt(rank)`` (Kalajdzievski 2023).
      dropout: dropout rate on the adapter input (on only when `lorax.lora` gets ``rng``).
      init_a: ``"kaiming_uniform"`` (PEFT's default) or ``"gaussian"`` (std 1/r).
      dtype: adapter dtype; default the weight's.
      trainable: regexes of plain leaves trained fully (PEFT's ``modules_to_save``).

    >>> import lorax
    >>> lorax.LoraConfig(rank=8, alpha=16.0).scale_for("h/query/kernel")
    2.0
    """

    rank: int = 8
    alpha: float | None = None
    targets: Targets = ALL_LINEAR
    exclude: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    init_a: Literal["kaiming_uniform", "gaussian"] = "kaiming_uniform"
    dtype: Any = None
    trainable: str | Sequence[str] | None = None

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"LoraConfig: {name} must be a mapping {{regex: value}}, got {value!r}.")
        fix("rank", index(self.rank, "LoraConfig: rank for 'rank'", minimum=1))
        fix("rank_pattern", {k: index(v, f"LoraConfig: rank for {k!r}", minimum=1) for k, v in self.rank_pattern.items()})
        if self.alpha is not None:
            fix("alpha", real(self.alpha, "LoraConfig: alpha for 'alpha'", positive=True))
        fix("alpha_pattern", {k: real(v, f"LoraConfig: alpha for {k!r}", positive=True)
                              for k, v in self.alpha_pattern.items()})
        fix("dropout", real(self.dropout, "LoraConfig: dropout"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise TypeError(f"LoraConfig: use_rslora must be True or False, got {self.use_rslora!r}.")
        fix("use_rslora", bool(self.use_rslora))
        if self.init_a not in ("kaiming_uniform", "gaussian"):
            raise ValueError(f"LoraConfig: init_a must be 'kaiming_uniform' or 'gaussian', got {self.init_a!r}.")
        if self.dtype is not None:
            try:
                jnp.dtype(self.dtype)
            except TypeError:
                raise TypeError(f"LoraConfig: dtype must be None or a dtype, got {self.dtype!r}.") from None
        if not callable(self.targets) and self.targets != ALL_LINEAR:
            _patterns(self.targets, "targets")
        _patterns(self.exclude, "exclude")
        _patterns(self.trainable, "trainable")
        _patterns(list(self.rank_pattern), "rank_pattern")
        _patterns(list(self.alpha_pattern), "alpha_pattern")

    def record(self) -> dict:
        """A JSON-able description (callables and dtypes by name), for checkpoint metadata."""
        plain = lambda v: v if isinstance(v, (int, float, str, bool, type(None), list, dict, tuple)) else repr(v)  # noqa: E731
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def rank_for(self, path: str) -> int:
        return first_match(self.rank_pattern, path, self.rank)

    def scale_for(self, path: str) -> float:
        rank = self.rank_for(path)
        alpha = first_match(self.alpha_pattern, path, self.alpha if self.alpha is not None else rank)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def targets_path(self, path: str, leaf: Any, linear: bool) -> bool:
        """Whether ``path`` is asked for (``linear``: used by a matmul or convolution)."""
        if any(p.fullmatch(path) for p in _patterns(self.exclude, "exclude")):
            return False
        if callable(self.targets):
            return bool(self.targets(path, leaf))
        if self.targets == ALL_LINEAR:
            return linear
        return any(p.fullmatch(path) for p in _patterns(self.targets, "targets"))

    def is_trainable(self, path: str) -> bool:
        return any(p.fullmatch(path) for p in _patterns(self.trainable, "trainable"))
