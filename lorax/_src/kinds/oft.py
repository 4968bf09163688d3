"""OFT (Qiu et al. 2023), as PEFT's current `OFTConfig`: a block-diagonal rotation R of W's input
space, ``(x·R)·W``, each block the Cayley transform of a trained skew-symmetric matrix.

Written only against `lorax.extend`. The rotation is applied to the input, never to W: an input
row is cut into blocks of ``block_size`` features, each turned by its block (a product of
``rows × in × block_size``), then the frozen product runs as usual. Each block's ``b·(b-1)/2``
trained numbers fill the upper triangle of ``Q``, ``S = Q - Qᵀ`` and ``R = (I - S)(I + S)⁻¹`` (with
``neumann_terms=0``), or, as PEFT computes it by default, PEFT's truncated series
``I + 2S + 2S² + 2S³ + S⁴`` (``neumann_terms`` = 5; other counts as PEFT's). At zero, R is the
identity: the model starts unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import extend

BLOCKS, ELEMENTS = "blocks", "elements"  # layout entries: the blocks of W's input, each block's numbers
PEFT_KEYS = frozenset({"auto_mapping", "base_model_name_or_path", "bias", "block_share", "coft", "eps",
                       "exclude_modules", "fan_in_fan_out", "inference_mode", "init_weights", "layers_pattern",
                       "layers_to_transform", "module_dropout", "modules_to_save", "num_cayley_neumann_terms",
                       "oft_block_size", "peft_type", "peft_version", "r", "revision", "target_modules",
                       "task_type", "use_cayley_neumann"})


@extend.register_kind
@dataclasses.dataclass(frozen=True, repr=False)  # Adapter.__repr__ summarizes the arrays
class OftWeight(extend.Adapter):
    """A frozen weight ``w`` whose inputs are rotated by a trained block-diagonal ``R``: it stands
    for ``R·W`` (W as an ``[in, out]`` matrix). `lorax.init` builds these with
    ``LoraConfig(kind="oft", options={"block_size": b})``.

    Attributes:
      w: the frozen base weight (an array or a `QuantizedArray`).
      q: the trained upper triangles, ``(*stack, in / block_size, block_size·(block_size-1)/2)``
        (one block for all with ``block_share``); PEFT's ``oft_R.weight``.
      block_size: the features each block rotates.
      block_share: one block, shared by every block of the input.
      neumann_terms: the terms of the Cayley transform's Neumann series (PEFT's
        ``num_cayley_neumann_terms``); 0: the exact transform.

    >>> import jax.numpy as jnp, lorax
    >>> node = lorax.OftWeight(jnp.eye(2), jnp.array([[1.0]]), block_size=2, neumann_terms=0)
    >>> jnp.round(lorax.merge(node), 3).tolist()  # a rotation: R = (I - S)(I + S)⁻¹, S = [[0, 1], [-1, 0]]
    [[0.0, -1.0], [1.0, 0.0]]
    """

    kind = "oft"
    bounded_rank = False
    ranked = False

    q: jax.Array = extend.trained_field(group="a")
    block_size: int = extend.static_field(1)
    block_share: bool = extend.static_field(False)
    neumann_terms: int = extend.static_field(5)

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        return {"q": (*self.stack_axes, BLOCKS, ELEMENTS)}

    def axis_sizes(self, rank: int) -> dict[str, int]:
        b = self.block_size
        return {BLOCKS: 1 if self.block_share else _fan_in(self.shape, self.a_axes) // b, ELEMENTS: b * (b - 1) // 2}

    def rotations(self) -> jax.Array:
        """The blocks of R, ``(*stack, blocks, b, b)`` in float32 (every block, repeated when shared)."""
        b = self.block_size
        rows, cols = np.triu_indices(b, 1)
        upper = jnp.zeros((*self.q.shape[:-1], b, b), jnp.float32).at[..., rows, cols].set(self.q.astype(jnp.float32))
        skew = upper - jnp.swapaxes(upper, -1, -2)
        eye = jnp.eye(b, dtype=jnp.float32)
        n = self.neumann_terms
        if n == 0:  # (I - S)(I + S)⁻¹, as PEFT solves it
            t = lambda m: jnp.swapaxes(m, -1, -2)  # noqa: E731
            r = t(jnp.linalg.solve(t(eye + skew), t(eye - skew)))
        else:  # PEFT's series: I + 2S + 2S² + ... + 2Sⁿ⁻² + Sⁿ⁻¹ (from 3 terms on)
            r = eye + 2 * skew if n > 1 else jnp.broadcast_to(eye, skew.shape)
            if n > 2:
                power = skew @ skew
                r = r + 2 * power
                for _ in range(3, n - 1):
                    power = power @ skew
                    r = r + 2 * power
                r = r + power @ skew
        if self.block_share:
            r = jnp.repeat(r, _fan_in(self.shape, self.a_axes) // b, axis=-3)
        return r

    def _blockwise(self, w: jax.Array, turn) -> jax.Array:
        """``turn(blocks of R, rows of w cut in blocks)`` laid back out like ``w``, in float32."""
        node = self.replace(w=w)  # w's shape, also from the trainable half, whose w is None
        m = node.to_matrices(w).astype(jnp.float32)
        blocks = node.rotations()
        cut = m.reshape(*m.shape[:-2], blocks.shape[-3], self.block_size, m.shape[-1])
        return node.from_matrices(turn(blocks, cut).reshape(m.shape))

    def merged(self) -> jax.Array:
        w = extend.dense(self.w)
        return self._blockwise(w, lambda r, cut: jnp.einsum("...nkc,...nco->...nko", r, cut)).astype(w.dtype)

    def unmerged(self, merged: jax.Array, path: str = "") -> jax.Array:
        """``R⁻¹·merged``, block by block."""
        return self._blockwise(merged, jnp.linalg.solve).astype(merged.dtype)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``block_size`` (required), ``block_share`` (False) and ``neumann_terms`` (5; 0: exact).

        >>> import lorax
        >>> lorax.LoraConfig(kind="oft", options={"block_size": 8}).options
        {'block_size': 8, 'block_share': False, 'neumann_terms': 5}
        """
        unknown = sorted(set(options) - {"block_size", "block_share", "neumann_terms"})
        if unknown:
            raise ValueError(f"LoraConfig: the kind 'oft' takes the options 'block_size', 'block_share' and "
                             f"'neumann_terms', got {unknown}.")
        size, share, terms = options.get("block_size"), options.get("block_share", False), options.get(
            "neumann_terms", 5)
        if type(size) is not int or size < 2:
            raise ValueError(f"LoraConfig: the kind 'oft' needs options['block_size'], an int >= 2, got {size!r}.")
        if not isinstance(share, bool):
            raise TypeError(f"LoraConfig: options['block_share'] must be True or False, got {share!r}.")
        if type(terms) is not int or terms < 0:
            raise ValueError(f"LoraConfig: options['neumann_terms'] must be an int >= 0, got {terms!r}.")
        return {"block_size": size, "block_share": share, "neumann_terms": terms}

    @classmethod
    def create(cls, key: jax.Array, spec, w: jax.Array, use) -> OftWeight:
        """Zero triangles (R = I), one row of blocks per layer of a stack."""
        if spec.init != "kaiming_uniform" or spec.dropout:
            raise ValueError(f"lorax.init: the kind 'oft' ({spec.path!r}) starts at the identity and has no input "
                             f"dropout; got init={spec.init!r}, dropout={spec.dropout}.")
        b = spec.options["block_size"]
        fan_in = _fan_in(w.shape, use.a_axes)
        if fan_in % b:
            raise ValueError(f"lorax.init: the kind 'oft': block_size {b} does not divide the {fan_in} inputs of "
                             f"{spec.path!r} (shape {tuple(w.shape)}); choose a block size that divides it.")
        shell = cls(w, jnp.zeros(()), a_axes=use.a_axes, b_axes=use.b_axes, stack_axes=use.stack_axes,
                    block_size=b, block_share=spec.options["block_share"],
                    neumann_terms=spec.options["neumann_terms"])
        return shell.replace(q=jnp.zeros(shell.expected_shapes()["q"], spec.dtype_for(w.dtype)))


def _fan_in(shape, a_axes) -> int:
    return int(np.prod([shape[i] for i in a_axes]))


@extend.apply("dot_general", adapter=OftWeight)
def _dot(eqn, invals, ctx):
    """The frozen product of the rotated input: each block of an input row turned by its R."""
    m = extend.dot_matrices(eqn, invals, ctx)
    if m is None:
        return None
    blocks = m.weight.rotations()  # float32: the rotation is turned in float32 over a low-precision input too
    x = m.x.astype(jnp.float32).reshape(m.x.shape[0], blocks.shape[-3], m.weight.block_size)
    return [m.frozen(jnp.einsum("rnk,nkc->rnc", x, blocks).reshape(m.x.shape).astype(m.x.dtype))]


def _to_peft(node: OftWeight, layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"oft_R.weight": layer["q"]}


def _from_peft(node: OftWeight, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"q": tensors["oft_R.weight"]}


def _config(nodes: list[tuple[str, OftWeight]]) -> dict[str, Any]:
    settings = {(n.block_size, n.block_share, n.neumann_terms) for _, n in nodes}
    if len(settings) > 1:
        raise ValueError(f"lorax.peft: the OFT adapters have different block settings {sorted(settings)} "
                         "(block_size, block_share, neumann_terms); a PEFT folder holds one.")
    (size, share, terms), = settings
    return {"r": 0, "oft_block_size": size, "block_share": share, "use_cayley_neumann": terms > 0,
            "num_cayley_neumann_terms": terms or 5, "coft": False, "eps": 6e-5, "module_dropout": 0.0,
            "fan_in_fan_out": False, "bias": "none", "init_weights": True, "layers_to_transform": None,
            "layers_pattern": None}


def _options(config: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    """lorax reads the block size PEFT's config gives (``oft_block_size``, not ``r``) and refuses
    what it does not implement: COFT's projection, a bias."""
    if config.get("r", 0) or not config.get("oft_block_size"):
        raise ValueError(f"lorax.peft: OFT folders with r={config.get('r')!r} and oft_block_size="
                         f"{config.get('oft_block_size')!r}: lorax reads those given by oft_block_size (r=0).")
    if config.get("coft") or config.get("bias", "none") != "none":
        raise ValueError(f"lorax.peft: OFT with coft={config.get('coft')!r}, bias={config.get('bias')!r} is not "
                         "supported (lorax: coft false, bias 'none').")
    terms = config.get("num_cayley_neumann_terms", 5) if config.get("use_cayley_neumann", True) else 0
    return {"block_size": config["oft_block_size"], "block_share": bool(config.get("block_share", False)),
            "neumann_terms": terms}


OftWeight.peft = extend.PeftFormat("OFT", PEFT_KEYS, ("oft_R.weight",), _to_peft, _from_peft, _config, _options,
                                   ranked=False)
