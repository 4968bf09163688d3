"""Adapter checkpoints with orbax: only adapters and Trainable leaves, never the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lorax._src.config import LoraConfig
from lorax._src.paths import named_leaves
from lorax._src.sharding import factor_shardings
from lorax._src.trees import _map
from lorax._src.adapter import KINDS, Adapter
from lorax._src.initializers import makes_residual, residual
from lorax._src.trainable import Trainable

FORMAT = 1


def _entries(params: Any) -> tuple[list[dict], list[dict]]:
    """Metadata and arrays of every adapter and Trainable leaf, in tree order."""
    import lorax

    meta, arrays = [], []
    for path, leaf in named_leaves(params):
        if isinstance(leaf, Adapter):
            meta.append(dict(path=path, kind=leaf.kind, shape=list(leaf.shape), dtype=str(leaf.w.dtype),
                             rank=leaf.rank, scale=leaf.scale, a_axes=list(leaf.a_axes),
                             b_axes=list(leaf.b_axes), stack_axes=list(leaf.stack_axes),
                             dropout=leaf.dropout, init=leaf.init, factor_dtype=str(leaf.a.dtype),
                             lorax_version=lorax.__version__))
            arrays.append(leaf.trained())
        elif isinstance(leaf, Trainable):
            meta.append(dict(path=path, kind="trainable", shape=list(leaf.value.shape),
                             dtype=str(leaf.value.dtype)))
            arrays.append({"value": leaf.value})
    return meta, arrays


def _manager(directory: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(directory: str | Path, params: Any, *, step: int = 0, keep: int | None = None,
         config: LoraConfig | None = None) -> Path:
    """Write the adapters of ``params`` as step ``step`` under ``directory``.

    Each step is written to a temporary folder and renamed when complete (orbax), so a
    crash mid-save leaves earlier steps loadable; ``keep`` keeps only the newest steps.
    Each weight's rank, scale and axes are recorded; ``config`` (targets, rsLoRA, ...) too
    when given.

    >>> import jax, jax.numpy as jnp, lorax, tempfile
    >>> fn = lambda p, x: x @ p["w"]
    >>> base = {"w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    >>> folder = lorax.save(tempfile.mkdtemp(), lp, step=3)
    >>> lorax.load(folder.parent, base)["w"].rank
    2
    """
    meta, arrays = _entries(params)
    if not meta:
        raise ValueError("lorax.save: params hold no LoraWeight or Trainable leaf to save.")
    record = {"format": FORMAT, "weights": meta, "config": config.record() if config else None}
    with _manager(directory, keep) as manager:
        manager.save(step, args=ocp.args.Composite(adapters=ocp.args.StandardSave(arrays),
                                                   meta=ocp.args.JsonSave(record)))
        manager.wait_until_finished()
    return Path(directory) / str(step)


def load(directory: str | Path, base: Any, *, step: int | None = None) -> Any:
    """Read adapters saved by `save` onto the plain ``base`` tree (latest step by default).

    Refuses a base that does not fit, listing every mismatch (missing path, other shape
    or dtype). Factors are placed after the base weight's sharding.
    """
    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"lorax.load: no finished checkpoint in {str(directory)!r}.")
        try:
            record = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ValueError(f"lorax.load: step {step} in {str(directory)!r} is not a lorax checkpoint: {err}") from None
        entries = {e["path"]: e for e in record["weights"]}
        leaves = dict(named_leaves(base))
        problems = []
        for path, e in entries.items():
            leaf = leaves.get(path)
            if leaf is None:
                problems.append(f"  {path}: not in the base")
            elif isinstance(leaf, (Adapter, Trainable)):
                problems.append(f"  {path}: the base already holds a lorax node here; pass the plain tree")
            elif list(np.shape(leaf)) != e["shape"] or str(leaf.dtype) != e["dtype"]:
                problems.append(f"  {path}: base has {tuple(np.shape(leaf))} {leaf.dtype}, the adapter "
                                f"was saved for {tuple(e['shape'])} {e['dtype']}")
        if problems:
            raise ValueError("lorax.load: the checkpoint does not fit this base:\n" + "\n".join(problems))
        targets = [_abstract(e, leaves[e["path"]]) for e in record["weights"]]
        arrays = manager.restore(step, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(targets)))["adapters"]
    restored = {e["path"]: _node(e, leaves[e["path"]], x) for e, x in zip(record["weights"], arrays)}
    return _map(lambda path, leaf: restored.get(path, leaf), base)


def _shell(entry: dict, w, arrays: dict | None = None) -> Adapter:
    """The adapter an entry describes; trained arrays as shapes unless given."""
    kind = KINDS[entry["kind"]]
    shell = kind(w, *[None] * len(kind.trained_fields()), scale=entry["scale"], a_axes=tuple(entry["a_axes"]),
                 b_axes=tuple(entry["b_axes"]), stack_axes=tuple(entry["stack_axes"]), dropout=entry["dropout"],
                 init=entry.get("init", "kaiming_uniform"))
    if arrays is None:
        dtype = jnp.dtype(entry["factor_dtype"])
        arrays = {n: jax.ShapeDtypeStruct(s, dtype) for n, s in shell.expected_shapes(entry["rank"]).items()}
    return shell.replace(**arrays)


def _abstract(entry: dict, w) -> dict:
    """What orbax restores into: shapes, dtypes and shardings that follow the base weight."""
    sharding = getattr(w, "sharding", None)
    if entry["kind"] == "trainable":
        placed = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {"value": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=placed)}
    shell = _shell(entry, w)
    shardings = factor_shardings(shell, sharding)
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[k]) for k, x in shell.trained().items()}


def _node(entry: dict, w, arrays: dict):
    if entry["kind"] == "trainable":
        return Trainable(arrays["value"])
    node = _shell(entry, w, arrays)
    if makes_residual(node.init):  # PiSSA/OLoRA: the frozen base is the original W's residual
        node = node.replace(w=residual(node.init, w, node.a_axes, node.b_axes, node.stack_axes, entry["rank"],
                                       node.scale))
    return node
