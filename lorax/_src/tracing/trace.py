"""Flatten a call ``fn(params, *args, **kwargs)`` into array inputs and trace it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lorax._src import compat
from lorax._src.bases.quantized import is_frozen_base
from lorax._src.kinds.adapter import Adapter
from lorax._src.paths import render
from lorax._src.trainable import Trainable, is_node


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


@dataclasses.dataclass
class FlatCall:
    """The leaves of ``(params, args, kwargs)``: arrays and lorax nodes are traced
    inputs (``dynamic``), anything else (Python flags, callables) stays static."""

    leaves: list
    names: list[str]
    treedef: Any
    dynamic: list[int]
    num_params: int

    def rebuild(self, values) -> tuple[Any, tuple, dict]:
        leaves = list(self.leaves)
        for i, v in zip(self.dynamic, values):
            leaves[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def arrays(self) -> list:
        """What the traced function receives: ``w`` for an adapter, the value of a Trainable."""
        return [plain(self.leaves[i]) for i in self.dynamic]


def plain(leaf: Any) -> Any:
    """What ``fn`` is traced with for a leaf: the base of an adapter, the value of a
    Trainable, a weight-shaped stand-in for a quantized weight or `lorax.Bf16Bits`."""
    if isinstance(leaf, Adapter):
        leaf = leaf.w
    elif isinstance(leaf, Trainable):
        leaf = leaf.value
    if is_frozen_base(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return leaf


def flatten_call(params: Any, args: tuple, kwargs: dict) -> FlatCall:
    flat, treedef = jax.tree_util.tree_flatten_with_path((params, args, kwargs), is_leaf=is_node)
    num_params = len(jax.tree_util.tree_leaves(params, is_leaf=is_node))
    names = [render(path[1:]) for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    dynamic = [i for i, x in enumerate(leaves) if is_node(x) or is_array(x)]
    return FlatCall(leaves, names, treedef, dynamic, num_params)


def trace(fn: Callable, call: FlatCall) -> tuple[compat.ClosedJaxpr, Any]:
    """The jaxpr of ``fn`` over the plain arrays of ``call``, and its output tree."""

    def flat_fn(*values):
        params, args, kwargs = call.rebuild(values)
        return fn(params, *args, **kwargs)

    closed, out_shape = compat.make_jaxpr(flat_fn, *call.arrays())
    return closed, jax.tree_util.tree_structure(out_shape)
