"""LoKr (Edalati et al. 2022; LyCORIS): ``W + s·(K₁ ⊗ K₂)``, the Kronecker product of a small
block K₁ and a larger one K₂, each full or a rank-r product, as PEFT's `LoKrConfig`.

Written only against `lorax.extend`. W's input and output sizes are each split in two
(``in = m·n``, ``out = l·k``; PEFT's ``factorization`` with ``decompose_factor``), K₁ is
[m, l], K₂ [n, k]. Applied without the Kronecker product: an input row viewed as an [m, n]
matrix X gives ``K₁ᵀ·X·K₂`` [l, k], two small products per use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import extend

IN1, IN2, OUT1, OUT2 = "in1", "in2", "out1", "out2"  # layout entries: W's input/output split in two
PEFT_KEYS = frozenset({"alpha", "alpha_pattern", "auto_mapping", "base_model_name_or_path", "decompose_both",
                       "decompose_factor", "exclude_modules", "inference_mode", "init_weights", "layers_pattern",
                       "layers_to_transform", "module_dropout", "modules_to_save", "peft_type", "peft_version", "r",
                       "rank_dropout", "rank_dropout_scale", "rank_pattern", "revision", "target_modules",
                       "task_type", "use_effective_conv2d"})
PEFT_NAMES = {"k1": "lokr_w1", "k1_out": "lokr_w1_a", "k1_in": "lokr_w1_b",
              "k2": "lokr_w2", "k2_out": "lokr_w2_a", "k2_in": "lokr_w2_b"}  # each transposed


def split_dimension(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two factors of ``dimension``: ``(factor, dimension // factor)`` when ``factor`` divides it,
    else the pair ``m <= n`` with ``m`` the largest divisor at most ``√dimension`` and ``factor``
    (``-1``: no bound), as PEFT's LoKr splits a layer's sizes.

    >>> split_dimension(576), split_dimension(128), split_dimension(127), split_dimension(128, 4)
    ((24, 24), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, math.isqrt(dimension) + 1):
        if d > limit:
            break
        if dimension % d == 0:
            m = d
    return m, dimension // m


@extend.register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class LokrWeight(extend.Additive):
    """A frozen weight ``w`` with the update ``scale · K₁ ⊗ K₂`` (LoKr), W seen as an
    ``[in, out]`` matrix with ``in = m·n`` and ``out = l·k``. `lorax.init` builds these with
    ``LoraConfig(kind="lokr", rank=r, alpha=..., options={"decompose_both": ..., "decompose_factor": ...})``.

    K₁ [m, l] is ``k1`` (full), or ``k1_in·k1_out`` with ``decompose_both`` when
    ``r < max(m, l) / 2``; K₂ [n, k] is ``k2_in·k2_out`` when ``r < max(n, k) / 2``, else ``k2``
    (full): PEFT's rules. PEFT's ``lokr_w1``, ``lokr_w1_a``, ``lokr_w1_b`` (and the same for K₂)
    are ``k1``, ``k1_out``, ``k1_in`` transposed. At initialisation K₁ is zero (so the model starts
    unchanged), K₂ random.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      k1, k1_in, k1_out, k2, k2_in, k2_out: the trained blocks, those this node holds (the
        others None), each led by the stack axes.
      in_split: ``(m, n)``; out_split: ``(l, k)``.
      r: the rank of the factored blocks (PEFT's ``r``: ``scale = alpha / r``).
      factored: whether K₁, K₂ are rank-r products (``k1_in·k1_out``) rather than full (``k1``).

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LokrWeight(jnp.zeros((4, 4)), k1=jnp.eye(2), k2=jnp.array([[1.0, 2.0], [3.0, 4.0]]),
    ...                       in_split=(2, 2), out_split=(2, 2), r=1)
    >>> lorax.merge(lw).tolist()  # kron(K1, K2)
    [[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 4.0]]
    """

    kind = "lokr"
    bounded_rank = False

    k1: jax.Array | None = extend.trained_field(group="b", default=None)
    k1_in: jax.Array | None = extend.trained_field(group="a", default=None)
    k1_out: jax.Array | None = extend.trained_field(group="b", default=None)
    k2: jax.Array | None = extend.trained_field(group="a", default=None)
    k2_in: jax.Array | None = extend.trained_field(group="a", default=None)
    k2_out: jax.Array | None = extend.trained_field(group="b", default=None)
    in_split: tuple[int, int] = extend.static_field((1, 1))
    out_split: tuple[int, int] = extend.static_field((1, 1))
    r: int = extend.static_field(1)
    factored: tuple[bool, bool] = extend.static_field((False, False))

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        rank = extend.RANK
        one = {"k1_in": (IN1, rank), "k1_out": (rank, OUT1)} if self.factored[0] else {"k1": (IN1, OUT1)}
        two = {"k2_in": (IN2, rank), "k2_out": (rank, OUT2)} if self.factored[1] else {"k2": (IN2, OUT2)}
        return {name: (*self.stack_axes, *entries) for name, entries in (one | two).items()}

    def axis_sizes(self, rank: int) -> dict[str, int]:
        (m, n), (o, k) = self.in_split, self.out_split
        return {extend.RANK: rank, IN1: m, IN2: n, OUT1: o, OUT2: k}

    @property
    def rank(self) -> int:
        return self.r

    def blocks(self) -> tuple[jax.Array, jax.Array]:
        """``(K₁ [*stack, m, l], K₂ [*stack, n, k])``."""
        held = {name: getattr(self, name) for name in self.layout()}
        one = held["k1_in"] @ held["k1_out"] if self.factored[0] else held["k1"]
        two = held["k2_in"] @ held["k2_out"] if self.factored[1] else held["k2"]
        return one, two

    def delta(self) -> jax.Array:
        one, two = self.blocks()
        stack = one.shape[: len(self.stack_axes)]
        kron = jnp.einsum("...ml,...nk->...mnlk", one, two)
        return self.from_matrices(kron.reshape(*stack, math.prod(self.in_split), math.prod(self.out_split))
                                  * self.scale)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``decompose_both`` (False: K₁ full) and ``decompose_factor`` (-1: split near √size).

        >>> import lorax
        >>> lorax.LoraConfig(kind="lokr", options={"decompose_factor": 8}).options
        {'decompose_both': False, 'decompose_factor': 8}
        """
        unknown = sorted(set(options) - {"decompose_both", "decompose_factor"})
        if unknown:
            raise ValueError(f"LoraConfig: the kind 'lokr' takes the options 'decompose_both' and "
                             f"'decompose_factor', got {unknown}.")
        both, factor = options.get("decompose_both", False), options.get("decompose_factor", -1)
        if not isinstance(both, bool):
            raise TypeError(f"LoraConfig: options['decompose_both'] must be True or False, got {both!r}.")
        if type(factor) is not int or not (factor == -1 or factor > 0):
            raise ValueError(f"LoraConfig: options['decompose_factor'] must be -1 or a positive int, got {factor!r}.")
        return {"decompose_both": both, "decompose_factor": factor}

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> LokrWeight:
        """PEFT's shapes and initialisation: K₁ zero (``k1_out`` zero when factored), the others
        uniform within ``±1/√fan_in`` of their torch parameter."""
        if spec.init != "kaiming_uniform":
            raise ValueError(f"lorax.init: the kind 'lokr' ({spec.path!r}) starts as PEFT's LoKr; "
                             f"got init={spec.init!r}.")
        dtype, r = spec.dtype_for(w.dtype), spec.rank
        factor = spec.options.get("decompose_factor", -1)
        (m, n) = split_dimension(math.prod(w.shape[i] for i in use.a_axes), factor)
        (o, k) = split_dimension(math.prod(w.shape[i] for i in use.b_axes), factor)
        stack = tuple(w.shape[i] for i in use.stack_axes)
        k1_, k2_ = jax.random.split(key)
        uniform = lambda key, shape, fan: jax.random.uniform(  # noqa: E731
            key, (*stack, *shape), dtype, -1 / math.sqrt(fan), 1 / math.sqrt(fan))
        factored = (spec.options.get("decompose_both", False) and r < max(m, o) / 2, r < max(n, k) / 2)
        blocks: dict[str, jax.Array] = {}
        if factored[0]:
            blocks.update(k1_in=uniform(k1_, (m, r), m), k1_out=jnp.zeros((*stack, r, o), dtype))
        else:
            blocks.update(k1=jnp.zeros((*stack, m, o), dtype))
        if factored[1]:
            one, two = jax.random.split(k2_)
            blocks.update(k2_in=uniform(one, (n, r), n), k2_out=uniform(two, (r, k), r))
        else:
            blocks.update(k2=uniform(k2_, (n, k), n))
        return cls(w, scale=spec.scale, a_axes=use.a_axes, b_axes=use.b_axes, stack_axes=use.stack_axes,
                   dropout=spec.dropout, in_split=(m, n), out_split=(o, k), r=r, factored=factored).replace(**blocks)


@extend.apply("dot_general", adapter=LokrWeight)
def _dot(eqn, invals, ctx):
    """``x·W + s·vec(K₁ᵀ·X·K₂)``, X an input row as an [m, n] matrix."""
    mats = extend.dot_matrices(eqn, invals, ctx)
    if mats is None:
        return None
    lw = mats.weight
    one, two = (b.astype(mats.x.dtype) for b in lw.blocks())
    x = mats.x.reshape(-1, *lw.in_split)
    y = jnp.einsum("rmk,ml->rlk", (x @ two) * lw.scale, one)
    return [mats.base + mats.output(y.reshape(x.shape[0], -1))]


def _to_peft(node: LokrWeight, layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {PEFT_NAMES[n]: x.T for n, x in layer.items()}


def _from_peft(node: LokrWeight, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: tensors[PEFT_NAMES[n]].T for n in node.layer_shapes()}


def _config(nodes: list[tuple[str, LokrWeight]]) -> dict[str, Any]:
    """``decompose_both`` and ``decompose_factor`` that give every node's blocks by PEFT's rules;
    nodes no one setting gives (built by hand, or under different options) are refused."""
    both = any(node.factored[0] for _, node in nodes)
    splits = {s for _, node in nodes for s in (node.in_split[0], node.out_split[0])}
    for factor in (-1, *sorted(splits)):
        if all(_peft_shapes(node, both, factor) for _, node in nodes):
            return {"decompose_both": both, "decompose_factor": factor, "rank_dropout": 0.0, "module_dropout": 0.0,
                    "rank_dropout_scale": False, "use_effective_conv2d": False, "init_weights": True,
                    "layers_to_transform": None, "layers_pattern": None}
    module, node = nodes[0]
    raise ValueError(f"lorax.peft: the LoKr blocks (in_split={node.in_split}, out_split={node.out_split}, "
                     f"factored={node.factored}, r={node.r} at {module!r}, ...) are not what PEFT builds for any "
                     "one decompose_both / decompose_factor; build them with lorax.init.")


def _peft_shapes(node: LokrWeight, both: bool, factor: int) -> bool:
    """Whether PEFT, with these options, gives ``node``'s splits and full/factored blocks."""
    (m, n), (o, k), r = node.in_split, node.out_split, node.r
    splits = (split_dimension(m * n, factor), split_dimension(o * k, factor))
    return splits == (node.in_split, node.out_split) and node.factored == (both and r < max(m, o) / 2,
                                                                          r < max(n, k) / 2)


def _options(config: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    return {"decompose_both": bool(config.get("decompose_both", False)),
            "decompose_factor": config.get("decompose_factor", -1)}


LokrWeight.peft = extend.PeftFormat("LOKR", PEFT_KEYS, tuple(sorted(PEFT_NAMES.values())), _to_peft, _from_peft,
                                    _config, _options)
