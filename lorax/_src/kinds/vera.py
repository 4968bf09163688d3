"""VeRA (Kopiczko et al. 2024): ``W + Λ_b·B·Λ_d·A``, a frozen random pair A [r, in], B [out, r]
shared by every adapted weight, and two trained vectors per weight (``d`` over the rank, ``b``
over the outputs), as PEFT's `VeraConfig`.

Written only against `lorax.extend`. One pair serves the whole model, sized to the widest
weight: a weight uses its first ``in`` columns of A and first ``out`` rows of B, as PEFT does.
The nodes hold the same two arrays (`lorax.extend.shared_field`): passed whole to each layer of
a stack, written once by checkpoints and PEFT folders. Factored as a LoRA whose factors are the
projections rescaled by the vectors: ``x·W + ((x·Aᵀ)·Λ_d)·Bᵀ·Λ_b``, never a weight-sized array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import extend

PEFT_KEYS = frozenset({"auto_mapping", "base_model_name_or_path", "bias", "d_initial", "fan_in_fan_out",
                       "inference_mode", "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save",
                       "peft_type", "peft_version", "projection_prng_key", "r", "revision", "save_projection",
                       "target_modules", "task_type", "vera_dropout"})
OPTIONS = {"projection_key": 0, "d_initial": 0.1}


@extend.register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class VeraWeight(extend.Additive):
    """A frozen weight ``w`` with the update ``diag(lambda_b)·B·diag(lambda_d)·A`` (torch's
    [out, in] layout; lorax's W is [in, out], so the update is its transpose). `lorax.init` builds
    these with ``LoraConfig(kind="vera", rank=r, options={"projection_key": 0, "d_initial": 0.1})``:
    ``lambda_d`` at ``d_initial``, ``lambda_b`` at zero (the model starts unchanged), A and B
    Kaiming-uniform from ``jax.random.key(projection_key)``, one pair for all the weights.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      lambda_d: the trained scaling of the rank, ``(*stack, rank)`` (PEFT's ``vera_lambda_d``).
      lambda_b: the trained scaling of the outputs, ``(*stack, *b_axes)`` (``vera_lambda_b``).
      vera_a: the frozen shared projection ``[rank, widest fan_in]`` (PEFT's ``vera_A``).
      vera_b: the frozen shared projection ``[widest fan_out, rank]`` (PEFT's ``vera_B``).
      projection_key: the seed A and B were drawn from.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.VeraWeight(jnp.zeros((2, 2)), jnp.array([2.0]), jnp.array([1.0, 3.0]),
    ...                       vera_a=jnp.ones((1, 4)), vera_b=jnp.ones((4, 1)))
    >>> lorax.merge(lw).tolist()  # lambda_b[o] · B[o]·lambda_d·A[:, i], as W[i, o]
    [[2.0, 6.0], [2.0, 6.0]]
    """

    kind = "vera"
    bounded_rank = False  # PEFT's default r is 256, above many weights' widths

    lambda_d: jax.Array = extend.trained_field(group="a")
    lambda_b: jax.Array = extend.trained_field(group="b")
    vera_a: jax.Array = extend.shared_field()
    vera_b: jax.Array = extend.shared_field()
    projection_key: int = extend.static_field(0)

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        return {"lambda_d": (*self.stack_axes, extend.RANK), "lambda_b": (*self.stack_axes, *self.b_axes)}

    def fans(self) -> tuple[int, int]:
        """``(fan_in, fan_out)``: W's contracted and output sizes."""
        return (math.prod(self.shape[i] for i in self.a_axes), math.prod(self.shape[i] for i in self.b_axes))

    def check(self, path: str = "") -> None:
        """`Adapter.check`, and projections that cover W and have the rank's rows."""
        super().check(path)
        fan_in, fan_out = self.fans()
        if self.vera_a is None or self.vera_b is None or self.vera_a.shape[0] != self.rank or \
                self.vera_b.shape[1] != self.rank or self.vera_a.shape[1] < fan_in or self.vera_b.shape[0] < fan_out:
            got = [None if x is None else tuple(x.shape) for x in (self.vera_a, self.vera_b)]
            raise ValueError(f"VeraWeight at {path!r}: the shared projections {got[0]} and {got[1]} do not cover "
                             f"w {self.shape}: expected ({self.rank}, >= {fan_in}) and (>= {fan_out}, {self.rank}).")

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(Aᵀ·Λ_d, Bᵀ·Λ_b)``: ``[*stack, fan_in, r]`` and ``[*stack, r, fan_out]``, this
        weight's slices of the projections rescaled: the update's LoRA factors."""
        fan_in, fan_out = self.fans()
        stack = self.lambda_d.shape[:-1]
        down = self.vera_a[:, :fan_in].T.astype(self.lambda_d.dtype) * self.lambda_d[..., None, :]
        up = self.vera_b[:fan_out].T.astype(self.lambda_b.dtype) * self.lambda_b.reshape(*stack, 1, fan_out)
        return down, up

    def delta(self) -> jax.Array:
        down, up = self.factors()
        return self.from_matrices(down @ up)

    def unmerged(self, merged: jax.Array, path: str = "") -> jax.Array:
        """``merged`` less the update, which needs the shared projections: a node of `lorax.split`'s
        trainable half (which lacks them) is refused."""
        if self.vera_a is None or self.vera_b is None:
            raise ValueError(f"lorax.unmerge: the VeRA update at {path!r} needs the shared projections, which "
                             "lorax.split's frozen half holds; pass the LoRA tree itself as adapters.")
        return super().unmerged(merged, path)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``projection_key`` (an int, PEFT's ``projection_prng_key``) and ``d_initial`` (a float).

        >>> import lorax
        >>> lorax.LoraConfig(kind="vera", options={"d_initial": 0.5}).options
        {'projection_key': 0, 'd_initial': 0.5}
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"LoraConfig: the kind 'vera' takes the options {sorted(OPTIONS)}, got {unknown}.")
        out = {**OPTIONS, **options}
        if not isinstance(out["projection_key"], int) or isinstance(out["projection_key"], bool) or \
                out["projection_key"] < 0:
            raise TypeError(f"LoraConfig: options['projection_key'] must be an int >= 0, got "
                            f"{out['projection_key']!r}.")
        if not isinstance(out["d_initial"], (int, float)) or isinstance(out["d_initial"], bool) or \
                not math.isfinite(out["d_initial"]):
            raise TypeError(f"LoraConfig: options['d_initial'] must be a finite number, got {out['d_initial']!r}.")
        return {"projection_key": out["projection_key"], "d_initial": float(out["d_initial"])}

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> VeraWeight:
        """The trained vectors (``lambda_d`` at ``d_initial``, ``lambda_b`` zero); the shared
        projections come with `link`. ``dropout`` drops the update's input, as PEFT's ``vera_dropout``."""
        if spec.init != "kaiming_uniform":
            raise ValueError(f"lorax.init: the kind 'vera' ({spec.path!r}) has its own initialisation; got "
                             f"init={spec.init!r}.")
        dtype = spec.dtype_for(w.dtype)
        stack = [w.shape[i] for i in use.stack_axes]
        outs = [w.shape[i] for i in use.b_axes]
        d = jnp.full((*stack, spec.rank), spec.options["d_initial"], dtype)
        return cls(w, d, jnp.zeros((*stack, *outs), dtype), a_axes=use.a_axes, b_axes=use.b_axes,
                   stack_axes=use.stack_axes, dropout=spec.dropout, projection_key=spec.options["projection_key"])

    @classmethod
    def link(cls, nodes: dict[str, Any]) -> dict[str, Any]:
        """One pair A, B for all ``nodes``, as wide as their widest fan-in and fan-out, drawn as
        PEFT draws them (uniform within ``±√(6 / fan_in)`` of each torch matrix)."""
        ranks = {path: node.rank for path, node in nodes.items()}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"lorax.init: VeRA's weights share one projection, so one rank; got {ranks}.")
        first = next(iter(nodes.values()))
        fan_in = max(node.fans()[0] for node in nodes.values())
        fan_out = max(node.fans()[1] for node in nodes.values())
        r, dtype = first.rank, first.factor_dtype
        ka, kb = jax.random.split(jax.random.key(first.projection_key))
        vera_a = jax.random.uniform(ka, (r, fan_in), dtype, -math.sqrt(6 / fan_in), math.sqrt(6 / fan_in))
        vera_b = jax.random.uniform(kb, (fan_out, r), dtype, -math.sqrt(6 / r), math.sqrt(6 / r))
        return {path: node.replace(vera_a=vera_a, vera_b=vera_b) for path, node in nodes.items()}


extend.apply("dot_general", adapter=VeraWeight)(extend.factors_dot)  # x·W + ((x·Aᵀ)·Λ_d)·(Bᵀ·Λ_b), scale 1


def _to_peft(node: VeraWeight, layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"vera_lambda_d": layer["lambda_d"], "vera_lambda_b": layer["lambda_b"].reshape(-1)}


def _from_peft(node: VeraWeight, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    shapes = node.layer_shapes()
    return {"lambda_d": tensors["vera_lambda_d"].reshape(shapes["lambda_d"]),
            "lambda_b": tensors["vera_lambda_b"].reshape(shapes["lambda_b"])}


def _config(nodes: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = sorted({node.projection_key for _, node in nodes})
    dropout = max(node.dropout for _, node in nodes)
    return {"projection_prng_key": keys[0], "save_projection": True, "d_initial": 0.1, "vera_dropout": dropout,
            "fan_in_fan_out": False, "bias": "none", "init_weights": True, "layers_to_transform": None,
            "layers_pattern": None}


def _options(config: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    key = config.get("projection_prng_key", 0)
    return {"projection_key": key if isinstance(key, int) and key >= 0 else 0}


VeraWeight.peft = extend.PeftFormat("VERA", PEFT_KEYS, ("vera_lambda_b", "vera_lambda_d"), _to_peft, _from_peft,
                                    _config, _options, scaled=False,
                                    shared={"vera_a": "base_model.vera_A", "vera_b": "base_model.vera_B"})
