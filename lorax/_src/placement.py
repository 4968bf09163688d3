"""Where restored training state lives: with the run it resumes, so the next jitted step takes it as is."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def place_state(restored: Any, template: Any, params: Any) -> Any:
    """Each restored state leaf placed for the next step of the run that loads it.

    A leaf whose template leaf is a ``jax.Array`` with a sharding of its own (a
    ``NamedSharding``, or any sharding over more than one device) takes that sharding;
    else, when the loaded ``params`` live on a mesh, it is replicated over that mesh (an
    optimizer's step count next to sharded moments); else it is a fresh uncommitted
    array, free to join any computation. NumPy and Python leaves of the template stay
    host values. Works alike on one process and on many (every process holds the same
    restored value).

    >>> import jax, jax.numpy as jnp
    >>> count = jax.device_put(jnp.int32(3), jax.devices()[0])  # committed, as a checkpoint restores it
    >>> placed = place_state({"count": count, "step": 3}, {"count": jnp.int32(0), "step": 0}, {"w": jnp.ones(2)})
    >>> placed["count"].committed, int(placed["count"]), placed["step"]
    (False, 3, 3)
    """
    mesh = params_mesh(params)
    return jax.tree.map(lambda like, x: _place(like, x, mesh), template, restored)


def params_mesh(params: Any) -> Mesh | None:
    """The largest mesh a ``NamedSharding`` of ``params`` spans, or None when no leaf has one."""
    shardings = [x.sharding for x in jax.tree.leaves(params) if isinstance(x, jax.Array)]
    meshes = [s.mesh for s in shardings if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh)]
    return max(meshes, key=lambda mesh: mesh.size, default=None)


def _place(like: Any, x: Any, mesh: Mesh | None) -> Any:
    if not isinstance(like, jax.Array):
        return x
    if isinstance(like.sharding, NamedSharding) or len(like.sharding.device_set) > 1:
        return _put(x, like.sharding)
    if mesh is not None:
        return _put(x, NamedSharding(mesh, PartitionSpec()))
    return jnp.asarray(np.asarray(x))  # uncommitted: on the default device until a computation places it


def _put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` with ``sharding``; a host-local value becomes a global array every process fills alike."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    local = np.asarray(x)
    return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])
