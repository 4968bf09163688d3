"""`LoraConfig`: which weights to adapt and how."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax._src.kinds.initializers import valid_init
from lorax._src.paths import regexes
from lorax._src.validate import index, real

Targets = str | Sequence[str] | Callable[[str, Any], bool]
"""Which weights `LoraConfig` adapts (its ``targets``), one of:

- ``"all-linear"`` (the default): every weight that ``fn`` uses as a matmul, einsum or
  convolution weight, except embedding tables and a head tied to them;
- a regex, or a list of regexes, fully matched (``re.fullmatch``) against each parameter's
  path: its keys joined with ``/``, as ``"params/h_0/attn/query/kernel"``;
- a predicate ``(path, leaf) -> bool``.

``LoraConfig(exclude=...)`` then removes paths. Targets that match no weight are an error that
lists the candidate weights.

>>> import jax, jax.numpy as jnp, lorax
>>> fn = lambda p, x: x @ p["attn"]["query"] @ p["attn"]["value"] @ p["mlp"]
>>> base = {"attn": {"query": jnp.ones((4, 4)), "value": jnp.ones((4, 4))}, "mlp": jnp.ones((4, 2))}
>>> adapted = lambda targets: [row.path for row in lorax.explain(fn, lorax.init(
...     jax.random.key(0), lorax.LoraConfig(rank=1, targets=targets), fn, base, jnp.ones((1, 4))),
...     jnp.ones((1, 4))).rows]
>>> adapted("all-linear"), adapted("attn/.*"), adapted(["mlp", "attn/value"])
(['attn/query', 'attn/value', 'mlp'], ['attn/query', 'attn/value'], ['attn/value', 'mlp'])
>>> adapted(lambda path, leaf: leaf.shape[-1] == 2)
['mlp']
"""

ALL_LINEAR = "all-linear"
"""``targets="all-linear"``, `LoraConfig`'s default: every weight of two or more axes that ``fn``
uses as a matmul, einsum or convolution weight (read from how ``fn`` uses it, not from its
name), except embedding tables (read by index) and a head tied to one. Weights that are not
floating or whose use contracts no axis (an RMSNorm scale written as an einsum) are passed
over and listed in `lorax.explain`'s ``skipped``.

>>> import jax, jax.numpy as jnp, lorax
>>> def fn(p, ids):  # an embedding, an RMSNorm-like scale, a projection and a tied head
...     h = jnp.einsum("bte,e->bte", p["embed"][ids], p["norm"]) @ p["proj"]
...     return h @ p["embed"].T
>>> base = {"embed": jnp.ones((10, 4)), "norm": jnp.ones(4), "proj": jnp.ones((4, 4))}
>>> ids = jnp.zeros((1, 3), int)
>>> report = lorax.explain(fn, lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, ids), ids)
>>> [row.path for row in report.rows], report.skipped
(['proj'], [('norm', 'its use contracts no axis (an elementwise scale)')])
"""


def _patterns(value: str | Sequence[str] | None, field: str) -> tuple[re.Pattern, ...]:
    if value is None:
        return ()
    extra = ", 'all-linear' or a predicate (path, leaf) -> bool" if field == "targets" else ""
    return regexes(value, f"LoraConfig.{field}: expected a regex string or a list of them{extra}, got {value!r}.",
                   f"LoraConfig.{field}:")


def first_match(patterns: Sequence[tuple[re.Pattern, Any]], path: str, default: Any) -> Any:
    """The value of the first ``(regex, value)`` entry that fully matches ``path``."""
    for pattern, value in patterns:
        if pattern.fullmatch(path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What `LoraConfig` asks for one weight, resolved once: the adapter ``kind`` (its
    name in `lorax._src.kinds.adapter.KINDS`), rank, scale, initialisation, dropout and dtype, the
    weight's ``path`` and the kind's own ``options`` (checked by its ``check_options``)."""

    kind: str
    rank: int
    scale: float
    init: str
    dropout: float
    dtype: Any
    path: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def dtype_for(self, weight_dtype) -> Any:
        """The adapter's dtype over a weight of ``weight_dtype``: the one asked for, else
        float32 over a 16-bit float weight (factors trained in bf16 lose small updates), else
        the weight's."""
        if self.dtype is not None:
            return self.dtype
        return jnp.float32 if jnp.dtype(weight_dtype) in (jnp.bfloat16, jnp.float16) else weight_dtype


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
      rank_pattern: ``{regex: rank}`` per weight path; the first full match wins.
      alpha_pattern: ``{regex: alpha}`` per weight path; the first full match wins.
      use_rslora: scale by ``alpha / sqrt(rank)`` (Kalajdzievski 2023).
      dropout: dropout rate on the adapter input (on only when `lorax.lora` gets ``rng``).
      init: ``"kaiming_uniform"`` (PEFT's default), ``"gaussian"`` (std 1/r), ``"pissa"``
        (top-r singular vectors of W; the base becomes the residual), ``"pissa_niter_K"``
        (the same by randomized SVD) or ``"olora"`` (QR). Outputs are unchanged at init.
      use_dora: DoRA (a trained magnitude per output unit) instead of plain LoRA; the same as
        ``kind="dora"``.
      dtype: adapter dtype; default the weight's, but float32 over bf16/fp16 weights (as PEFT).
      trainable: regexes of plain leaves trained fully (PEFT's ``modules_to_save``).
      kind: the adapter kind by its registered name: ``"lora"``, ``"dora"``, or a kind
        registered with `lorax.extend.register_kind` that implements ``create``. Default
        (None): ``"dora"`` with ``use_dora``, else ``"lora"`` (`adapter_kind` says which).
      options: the kind's own settings, checked by it (``Adapter.check_options``): IA³'s
        ``feedforward`` regexes, LoKr's ``decompose_both`` and ``decompose_factor``, OFT's
        ``block_size``, ``block_share`` and ``neumann_terms``. LoRA and DoRA take none.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: x @ p["q"] @ p["v"]
    >>> base, x = {"q": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}, jnp.ones((1, 4))
    >>> config = lorax.LoraConfig(rank=2, alpha=4.0, rank_pattern={"v": 1})
    >>> lp = lorax.init(jax.random.key(0), config, fn, base, x)
    >>> [(row.path, row.rank, row.scale) for row in lorax.explain(fn, lp, x).rows]  # scale alpha / rank
    [('q', 2, 2.0), ('v', 1, 4.0)]
    >>> lorax.LoraConfig(kind="dora").adapter_kind, lorax.LoraConfig(use_dora=True).adapter_kind
    ('dora', 'dora')
    >>> lorax.LoraConfig(rank=0)
    Traceback (most recent call last):
    ValueError: LoraConfig: rank for 'rank' must be a positive int, got 0.
    """

    rank: int = 8
    alpha: float | None = None
    targets: Targets = ALL_LINEAR
    exclude: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    dtype: Any = None
    trainable: str | Sequence[str] | None = None
    use_dora: bool = False
    kind: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"LoraConfig: {name} must be a mapping {{regex: value}}, got {value!r}.")
        fix("rank", index(self.rank, "LoraConfig: rank for 'rank'", minimum=1))
        fix("rank_pattern", {k: index(v, f"LoraConfig: rank for {k!r}", minimum=1)
                             for k, v in self.rank_pattern.items()})
        if self.alpha is not None:
            fix("alpha", real(self.alpha, "LoraConfig: alpha for 'alpha'", positive=True))
        fix("alpha_pattern", {k: real(v, f"LoraConfig: alpha for {k!r}", positive=True)
                              for k, v in self.alpha_pattern.items()})
        fix("dropout", real(self.dropout, "LoraConfig: dropout"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"LoraConfig: {name} must be True or False, got {getattr(self, name)!r}.")
            fix(name, bool(getattr(self, name)))
        self._check_kind()
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise TypeError(f"LoraConfig: options must be a mapping {{name: value}}, got {self.options!r}.")
        from lorax._src.kinds.adapter import KINDS  # the kinds register on import

        fix("options", KINDS[self.adapter_kind].check_options(dict(self.options)))
        if not valid_init(self.init):
            raise ValueError("LoraConfig: init must be 'kaiming_uniform', 'gaussian', 'pissa', "
                             f"'pissa_niter_K' or 'olora', got {self.init!r}.")
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

    @property
    def adapter_kind(self) -> str:
        """The kind `lorax.init` creates: ``kind``, else ``"dora"`` with ``use_dora``, else ``"lora"``."""
        return self.kind if self.kind is not None else "dora" if self.use_dora else "lora"

    def _check_kind(self) -> None:
        """``kind`` names a registered kind that `lorax.init` can create, and agrees with ``use_dora``."""
        from lorax._src.kinds.adapter import KINDS, creatable  # the kinds register on import

        if self.kind is None:
            return
        names = sorted(name for name, cls in KINDS.items() if creatable(cls))
        if not isinstance(self.kind, str):
            raise TypeError(f"LoraConfig: kind must be None or a kind's name, one of {names}, got {self.kind!r}.")
        if self.kind not in names:
            raise ValueError(f"LoraConfig: kind must be one of {names} (a kind registered with "
                             f"lorax.extend.register_kind that implements create), got {self.kind!r}.")
        if self.use_dora and self.kind != "dora":
            raise ValueError(f"LoraConfig: use_dora=True asks for DoRA but kind={self.kind!r}; give one of them.")

    def record(self) -> dict:
        """A JSON-able description (callables and dtypes by name), for checkpoint metadata."""
        plain = lambda v: v if isinstance(v, (int, float, str, bool, type(None), list, dict, tuple)) else repr(v)  # noqa: E731
        return {**{f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}, "kind": self.adapter_kind}

    @functools.cached_property
    def _compiled(self) -> dict[str, Any]:
        """The regexes, compiled once."""
        return dict(exclude=_patterns(self.exclude, "exclude"),
                    targets=() if callable(self.targets) or self.targets == ALL_LINEAR
                    else _patterns(self.targets, "targets"),
                    trainable=_patterns(self.trainable, "trainable"),
                    rank=[(re.compile(k), v) for k, v in self.rank_pattern.items()],
                    alpha=[(re.compile(k), v) for k, v in self.alpha_pattern.items()])

    def resolve(self, path: str, leaf: Any, linear: bool) -> AdapterSpec | None:
        """What this config asks for the weight at ``path`` (its kind, rank, scale, init,
        dropout and dtype), or None when it is not a target (``linear``: the leaf is used by
        a matmul or convolution, for ``"all-linear"``)."""
        patterns = self._compiled
        if any(p.fullmatch(path) for p in patterns["exclude"]):
            return None
        if callable(self.targets):
            wanted = bool(self.targets(path, leaf))
        elif self.targets == ALL_LINEAR:
            wanted = linear
        else:
            wanted = any(p.fullmatch(path) for p in patterns["targets"])
        if not wanted:
            return None
        rank = first_match(patterns["rank"], path, self.rank)
        alpha = first_match(patterns["alpha"], path, self.alpha if self.alpha is not None else rank)
        scale = alpha / (math.sqrt(rank) if self.use_rslora else rank)
        return AdapterSpec(self.adapter_kind, rank, scale, self.init, self.dropout, self.dtype, path, self.options)

    def is_trainable(self, path: str) -> bool:
        """Whether ``trainable`` names ``path`` (a leaf trained fully)."""
        return any(p.fullmatch(path) for p in self._compiled["trainable"])
