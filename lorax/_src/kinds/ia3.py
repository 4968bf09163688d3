"""IA³ (Liu et al. 2022): a learned vector rescaling a weight's outputs, or, for the weights
named ``feedforward`` (PEFT's ``feedforward_modules``, a feed-forward block's down projection),
its inputs: ``x·(W·diag(l))`` or ``(x·diag(l))·W``.

Written only against `lorax.extend`. Nothing of W's size is built per use: the frozen product
is rescaled, or its input is. No rank, no scale: the vector starts at ones, so the model starts
unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import extend

PEFT_KEYS = frozenset({"auto_mapping", "base_model_name_or_path", "exclude_modules", "fan_in_fan_out",
                       "feedforward_modules", "inference_mode", "init_ia3_weights", "modules_to_save",
                       "peft_type", "peft_version", "revision", "target_modules", "task_type"})


@extend.register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class Ia3Weight(extend.Adapter):
    """A frozen weight ``w`` whose outputs (or, with ``on_input``, inputs) are rescaled by a
    trained ``vector`` l (PEFT's ``ia3_l``): it stands for ``W·diag(l)`` (``diag(l)·W``). `lorax.init` builds
    these with ``LoraConfig(kind="ia3", options={"feedforward": regexes})``.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      vector: the trained scaling, ``(*stack, *b_axes)``, or ``(*stack, *a_axes)`` with
        ``on_input``; ones at initialisation.
      on_input: scale W's inputs (a feed-forward down projection) instead of its outputs.

    >>> import jax.numpy as jnp, lorax
    >>> w = jnp.ones((2, 3))
    >>> lorax.merge(lorax.Ia3Weight(w, jnp.array([1.0, 2.0, 3.0]))).tolist()
    [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    >>> lorax.merge(lorax.Ia3Weight(w, jnp.array([1.0, 2.0]), on_input=True)).tolist()
    [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """

    kind = "ia3"
    bounded_rank = False
    ranked = False

    vector: jax.Array = extend.trained_field(group="a")
    on_input: bool = extend.static_field(False)

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        return {"vector": (*self.stack_axes, *(self.a_axes if self.on_input else self.b_axes))}

    def scaling(self) -> jax.Array:
        """``vector`` laid out to broadcast against ``w``."""
        axes = self.layout()["vector"]
        order = sorted(axes)
        vector = jnp.transpose(self.vector, [axes.index(i) for i in order])
        return vector.reshape([self.shape[i] if i in axes else 1 for i in range(len(self.shape))])

    def merged(self) -> jax.Array:
        w = extend.dense(self.w)
        return (w * self.scaling().astype(w.dtype)).astype(w.dtype)

    def unmerged(self, merged: jax.Array, path: str = "") -> jax.Array:
        """``merged / vector``: defined while no entry of ``vector`` is zero."""
        scaling = self.replace(w=merged).scaling()  # from the trainable half, whose w is None
        return (merged / scaling.astype(merged.dtype)).astype(merged.dtype)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``feedforward``: a regex or list of regexes of the weight paths whose inputs are scaled.

        >>> import lorax
        >>> lorax.LoraConfig(kind="ia3", options={"feedforward": ".*/down"}).options
        {'feedforward': ('.*/down',)}
        """
        unknown = sorted(set(options) - {"feedforward"})
        if unknown:
            raise ValueError(f"LoraConfig: the kind 'ia3' takes the option 'feedforward', got {unknown}.")
        patterns = options.get("feedforward") or ()
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"LoraConfig: options['feedforward'] must be a regex or a list of regexes, "
                            f"got {options.get('feedforward')!r}.")
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"LoraConfig: options['feedforward'] regex {p!r} is not valid ({err}).") from None
        return {"feedforward": tuple(patterns)}

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> Ia3Weight:
        """A ``vector`` of ones over W's outputs, or its inputs for a ``feedforward`` path."""
        refuse_lora_settings("ia3", spec)
        on_input = any(re.fullmatch(p, spec.path) for p in spec.options.get("feedforward", ()))
        axes = use.a_axes if on_input else use.b_axes
        shape = [w.shape[i] for i in (*use.stack_axes, *axes)]
        return cls(w, jnp.ones(shape, spec.dtype_for(w.dtype)), a_axes=use.a_axes, b_axes=use.b_axes,
                   stack_axes=use.stack_axes, on_input=on_input)


@extend.apply("dot_general", adapter=Ia3Weight)
def _dot(eqn, invals, ctx):
    """The frozen product rescaled per output, or the frozen product of the rescaled input."""
    m = extend.dot_matrices(eqn, invals, ctx)
    if m is None:
        return None
    vector = m.weight.vector.reshape(-1)
    if m.weight.on_input:
        return [m.frozen(m.x * vector.astype(m.x.dtype))]
    return [m.base * m.along_outputs(vector).astype(m.base.dtype)]


def refuse_lora_settings(kind: str, spec) -> None:
    """Refuse LoRA's initialisations and adapter dropout for a kind that has neither."""
    if spec.init != "kaiming_uniform" or spec.dropout:
        raise ValueError(f"lorax.init: the kind {kind!r} ({spec.path!r}) has its own initialisation and no "
                         f"adapter dropout; got init={spec.init!r}, dropout={spec.dropout}.")


def _to_peft(node: Ia3Weight, layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT's ``ia3_l``: [out, 1], or [1, in] for a feed-forward module."""
    vector = layer["vector"].reshape(-1)
    return {"ia3_l": vector.reshape(1, -1) if node.on_input else vector.reshape(-1, 1)}


def _from_peft(node: Ia3Weight, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"vector": tensors["ia3_l"].reshape(node.layer_shapes()["vector"])}


def _config(nodes: list[tuple[str, Ia3Weight]]) -> dict[str, Any]:
    """``feedforward_modules``: the module names (last part) whose inputs are scaled."""
    names = {flag: {m.rsplit(".", 1)[-1] for m, node in nodes if node.on_input == flag} for flag in (True, False)}
    both = sorted(names[True] & names[False])
    if both:
        raise ValueError(f"lorax.peft: IA³ scales the inputs of some {both} modules and the outputs of others; "
                         "PEFT's feedforward_modules names a module kind for all its layers.")
    return {"feedforward_modules": sorted(names[True]), "fan_in_fan_out": False, "init_ia3_weights": True}


def _options(config: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    """The lorax paths of the modules PEFT's ``feedforward_modules`` names (a regex or names
    matched by suffix, as PEFT matches them)."""
    names = config.get("feedforward_modules") or []
    if isinstance(names, str):
        chosen = [path for path, module in modules.items() if re.fullmatch(names, module)]
    else:
        chosen = [path for path, module in modules.items()
                  if any(module == n or module.endswith("." + n) for n in names)]
    return {"feedforward": [re.escape(path) for path in chosen]}


Ia3Weight.peft = extend.PeftFormat("IA3", PEFT_KEYS, ("ia3_l",), _to_peft, _from_peft, _config, _options,
                                   ranked=False)
