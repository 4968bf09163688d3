"""Adapter checkpoints with orbax: only adapters and Trainable leaves, never the base."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax._src import compat
from lorax._src.bases.quantized import is_frozen_base, stored
from lorax._src.config import LoraConfig
from lorax._src.io.files import as_folder, remove, swap_in, writer_lock
from lorax._src.io.records import FORMAT, base_mismatch, check_record, fingerprint
from lorax._src.kinds.adapter import KINDS, Adapter
from lorax._src.kinds.initializers import makes_residual, residual
from lorax._src.paths import unique_named_leaves
from lorax._src.placement import place_state
from lorax._src.sharding import factor_shardings
from lorax._src.trainable import Trainable
from lorax._src.trees import _map
from lorax._src.validate import index, real
from lorax._src.version import __version__

STAGING = ".lorax-staging"  # a step is written here, then renamed into place


def _entries(params: Any) -> tuple[list[dict], list[dict], list[Any]]:
    """Metadata and arrays of every adapter and Trainable leaf, in tree order, and the arrays
    adapters share (`shared_field`), each once however many adapters hold it."""
    meta, arrays, shared = [], [], []
    for path, leaf in unique_named_leaves(params, "lorax.save"):
        if isinstance(leaf, Adapter):
            _concrete(path, *leaf.trained().values())
            _has_base(path, leaf)
            leaf.check(path)
            meta.append(dict(path=path, kind=leaf.kind, shape=list(leaf.shape), dtype=str(jnp.dtype(leaf.dtype)),
                             rank=leaf.rank, scale=real(leaf.scale, f"lorax.save: the scale of {path!r}"),
                             a_axes=list(leaf.a_axes), b_axes=list(leaf.b_axes), stack_axes=list(leaf.stack_axes),
                             dropout=float(leaf.dropout), init=leaf.init, factor_dtype=str(leaf.factor_dtype),
                             lorax_version=__version__, base=fingerprint(leaf.w),
                             **({"own": _own_meta(path, leaf)} if leaf.own_meta() else {}),
                             **({"shared": {n: _once(shared, getattr(leaf, n)) for n in leaf.shared_fields()}}
                                if leaf.shared_fields() else {})))
            arrays.append(leaf.trained())
        elif isinstance(leaf, Trainable):
            _concrete(path, leaf.value)
            meta.append(dict(path=path, kind="trainable", shape=list(leaf.value.shape),
                             dtype=str(leaf.value.dtype)))
            arrays.append({"value": leaf.value})
    return meta, arrays, shared


def _once(shared: list[Any], x: jax.Array) -> int:
    """The index of ``x`` in ``shared``, appended unless an equal array is there already."""
    for i, y in enumerate(shared):
        if y is x or (y.shape == x.shape and y.dtype == x.dtype and bool(jnp.array_equal(y, x))):
            return i
    shared.append(x)
    return len(shared) - 1


def _own_meta(path: str, leaf: Adapter) -> dict[str, Any]:
    """The static fields a kind adds (`Adapter.own_meta`), as JSON: numbers, strings, bools and
    tuples of them (read back as tuples)."""
    def plain(name, value):
        if isinstance(value, tuple):
            return [plain(name, v) for v in value]
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        raise TypeError(f"lorax.save: the {leaf.kind!r} adapter at {path!r} has {name}={value!r}, which a "
                        "checkpoint cannot record (numbers, strings, bools and tuples of them).")
    return {name: plain(name, value) for name, value in leaf.own_meta().items()}


def _has_base(path: str, leaf: Adapter) -> None:
    """Refuse an adapter without its concrete frozen base: `load` checks the base against its fingerprint."""
    w = stored(leaf.w)
    if not isinstance(w, (jax.Array, np.ndarray)) or compat.is_tracer(w):
        raise TypeError(f"lorax.save: the {type(leaf).__name__} at {path!r} holds {type(leaf.w).__name__} as its "
                        "frozen base w, not a concrete array (the trainable half of lorax.split, an abstract tree "
                        "from jax.eval_shape, or a call under jit?); save lorax.combine(trainable, frozen).")


def _concrete(path: str, *arrays) -> None:
    for x in arrays:
        if not isinstance(x, (jax.Array, np.ndarray)) or compat.is_tracer(x):
            raise TypeError(f"lorax.save: {path!r} holds {type(x).__name__}, not a concrete array "
                            "(an abstract tree from jax.eval_shape, or a call under jit?).")


def _manager(directory: Path, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=create)
    return ocp.CheckpointManager(directory, options=options)


def _steps(root: Path) -> list[int]:
    """The finished steps under ``root``, ascending (orbax renames a step into place when complete)."""
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and str(int(p.name)) == p.name
                  and p.is_dir())


def save(directory: str | Path, params: Any, *, step: int | None = None, keep: int | None = None,
         config: LoraConfig | None = None, overwrite: bool = False, state: Any = None) -> Path:
    """`lorax.save` of a tree of single adapters (`lorax._src.io.verbs.save`, whose docstring tells)."""
    root = as_folder(directory, "lorax.save", must_exist=False)
    step = None if step is None else index(step, "lorax.save: step")
    keep = None if keep is None else index(keep, "lorax.save: keep", minimum=1)
    if not isinstance(overwrite, bool):
        raise TypeError(f"lorax.save: overwrite must be True or False, got {overwrite!r}.")
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"lorax.save: config must be a lorax.LoraConfig or None, got {type(config).__name__}.")
    meta, arrays, shared = _entries(params)
    if not meta:
        raise ValueError("lorax.save: params hold no LoraWeight or Trainable leaf to save.")
    record = {"format": FORMAT, "weights": meta, "config": config.record() if config else None,
              "state": state is not None,
              **({"shared": [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in shared]} if shared else {})}
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lorax.save: the config cannot be written as JSON: {err}") from None
    items = dict(adapters=ocp.args.StandardSave(jax.tree.map(_global, arrays)), meta=ocp.args.JsonSave(record))
    if state is not None:
        items["state"] = ocp.args.StandardSave(jax.tree.map(_global, _state(state, "lorax.save")))
    if shared:
        items["shared"] = ocp.args.StandardSave({str(i): _global(x) for i, x in enumerate(shared)})
    if root.is_dir():  # refuse a step that is certainly wrong before touching the folder (rechecked below)
        _choose_step(root, step, _steps(root), overwrite)
    primary = jax.process_index() == 0  # on a multi-process run, process 0 alone moves folders
    root.mkdir(parents=True, exist_ok=True)
    _sync("lorax.save:start")
    with contextlib.ExitStack() as lock:
        refused = None
        if primary:
            try:
                lock.enter_context(writer_lock(root, "lorax.save"))
            except RuntimeError as err:
                refused = err
        if not _agree(refused is None):  # every process raises, none waits at a barrier for process 0
            raise refused or RuntimeError(f"lorax.save: process 0 found another process saving to "
                                          f"{str(root)!r}; one writer per folder at a time.")
        steps = _steps(root)
        step = _choose_step(root, step, steps, overwrite)
        staging = root / STAGING
        if primary:
            remove(staging)  # left by a crash: never a step
        _sync("lorax.save:staging")
        try:
            with _manager(staging, create=True) as manager:
                done = manager.save(step, args=ocp.args.Composite(**items), force=True)
                manager.wait_until_finished()
            if not done:
                raise RuntimeError(f"lorax.save: orbax skipped step {step} in {str(staging)!r}; nothing was written.")
            if primary:
                swap_in(staging / str(step), root / str(step))
        finally:
            if primary:
                remove(staging)
        for old in _expired(steps, step, keep) if keep is not None and primary else ():
            os.rename(root / str(old), staging)  # out of sight first, so no half-deleted step is visible
            remove(staging)
    _sync("lorax.save:done")
    return root / str(step)


def _expired(steps: list[int], written: int, keep: int) -> list[int]:
    """The steps `save` deletes after writing ``written`` with ``keep``: those outside the newest
    ``keep`` (``written`` counted) and older than ``written``; a newer step is never deleted."""
    newest = sorted({*steps, written})[-keep:]
    return [s for s in steps if s < written and s not in newest]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _agree(ok: bool) -> bool:
    """Process 0's ``ok``, on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))


def _global(x: Any) -> Any:
    """On a multi-process run, a host-local array or NumPy leaf (a replica every process holds
    alike) as a replicated global array, which orbax can write; anything else as is."""
    if jax.process_count() == 1 or not isinstance(x, (jax.Array, np.ndarray)) or \
            isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    local = np.asarray(x)
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())
    return jax.make_array_from_callback(local.shape, replicated, lambda index: local[index])


def _choose_step(root: Path, step: int | None, steps: list[int], overwrite: bool) -> int:
    latest = steps[-1] if steps else None
    if step is None:
        return 0 if latest is None else latest + 1
    if not overwrite and step in steps:
        raise ValueError(f"lorax.save: step {step} already exists in {str(root)!r}. Pass overwrite=True to "
                         "replace it, or step=None to write the next step.")
    if not overwrite and latest is not None and step < latest:
        raise ValueError(f"lorax.save: step {step} is lower than the latest step {latest} in {str(root)!r} "
                         "(another run's folder?); `load` would keep returning step "
                         f"{latest}. Use a fresh folder, or overwrite=True to write it anyway.")
    return step


def load(directory: str | Path, base: Any, *, step: int | None = None, state: Any = None,
         check_base: bool = True) -> Any:
    """`lorax.load` of a checkpoint folder of single adapters (`lorax._src.io.verbs.load`, whose docstring
    tells)."""
    root = as_folder(directory, "lorax.load", must_exist=True)
    if not isinstance(check_base, bool):
        raise TypeError(f"lorax.load: check_base must be True or False, got {check_base!r}.")
    steps = _steps(root)
    if step is None:
        if not steps:
            raise ValueError(f"lorax.load: no finished checkpoint in {str(root)!r}.")
        step = steps[-1]
    elif index(step, "lorax.load: step") not in steps:
        raise ValueError(f"lorax.load: no step {step} in {str(root)!r}; its steps are {steps}.")
    meta_file = root / str(step) / "meta" / "metadata"
    leaves = dict(unique_named_leaves(base, "lorax.load"))
    with _manager(root, create=False) as manager:
        try:
            record = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax and json raise many types for a missing or damaged item
            raise ValueError(f"lorax.load: {str(meta_file)!r} is missing or unreadable; step {step} is not "
                             f"a complete lorax checkpoint ({type(err).__name__}: {err}).") from None
        record = check_record(record, str(meta_file))
        problems = [f"  {e['path']}: {problem}" for e in record["weights"]
                    if (problem := _misfit(e, leaves.get(e["path"])))]
        if problems:
            raise ValueError("lorax.load: the checkpoint does not fit this base:\n" + "\n".join(problems))
        if state is not None and not record.get("state"):
            raise ValueError(f"lorax.load: step {step} in {str(root)!r} holds no training state (it was saved "
                             "without state=); load it without state=.")
        targets = [_abstract(e, leaves[e["path"]]) for e in record["weights"]]
        arrays = _restore(manager, step, "adapters", targets,
                          f"the arrays of step {step} in {str(root)!r} are missing or damaged")
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shared = _restore(manager, step, "shared", {
            str(i): jax.ShapeDtypeStruct(tuple(a["shape"]), jnp.dtype(a["dtype"]), sharding=single)
            for i, a in enumerate(record["shared"])}, f"the shared arrays of step {step} in {str(root)!r} are "
            "missing or damaged") if record.get("shared") else {}
        saved = None
        if state is not None:
            _check_state_template(root / str(step) / "state", state)
            saved = _restore(manager, step, "state", _state(state, "lorax.load"),
                             f"the state of step {step} in {str(root)!r} does not match the template given, "
                             "or is damaged")
            saved = jax.tree.map(lambda like, x: type(like)(x) if isinstance(like, (np.generic, int, float)) else x,
                                 state, saved)
    held = [{n: shared[str(i)] for n, i in e.get("shared", {}).items()} for e in record["weights"]]
    restored = {e["path"]: _node(e, leaves[e["path"]], {**x, **h}) for e, x, h in zip(record["weights"], arrays, held)}
    if check_base:
        _check_bases(record["weights"], restored, f"step {step} in {str(root)!r}")
    params = _map(lambda path, leaf: restored.get(path, leaf), base)
    return params if state is None else (params, place_state(saved, state, params))


def is_bank_folder(root: Path) -> bool:
    """Whether ``root`` holds no step of its own but checkpoint folders of named adapters (`save` of a
    bank tree)."""
    return not _steps(root) and any(p.is_dir() and not p.name.startswith(".") and _steps(p) for p in root.iterdir())


def _misfit(entry: dict, leaf: Any) -> str | None:
    """Why the base leaf ``leaf`` cannot take the weight ``entry`` describes, or None."""
    if leaf is None:
        return "not in the base"
    if isinstance(leaf, (Adapter, Trainable)):
        return "the base already holds a lorax node here; pass the plain tree"
    if not hasattr(leaf, "dtype"):
        return f"the base holds {type(leaf).__name__}, not an array"
    if list(leaf.shape) != entry["shape"] or str(jnp.dtype(leaf.dtype)) != entry["dtype"]:
        return (f"base has {tuple(leaf.shape)} {leaf.dtype}, the adapter was saved for {tuple(entry['shape'])} "
                f"{entry['dtype']}")
    if entry["kind"] != "trainable" and makes_residual(entry["init"]) and is_frozen_base(leaf):
        return (f"the adapter was initialised with init={entry['init']!r}, so its frozen base is a residual of the "
                f"original weight, which cannot be rebuilt over a quantized ({leaf.fmt}) base; load it onto the "
                "full-precision base")
    return None


def _check_bases(entries: list[dict], restored: dict, where: str) -> None:
    """Refuse frozen bases unlike the fingerprints recorded at save, listing each with both values."""
    problems = []
    for e in entries:
        if "base" in e and e["kind"] != "trainable":
            problem = base_mismatch(e["base"], restored[e["path"]].w)
            residual_note = " (its PiSSA/OLoRA residual)" if makes_residual(e["init"]) else ""
            problems += [f"  {e['path']}{residual_note}: {problem}"] if problem else []
    if problems:
        raise ValueError(f"lorax.load: the base is not the one the adapters of {where} were trained on:\n"
                         + "\n".join(problems) + "\nA base already merged with these adapters (lorax.merge, "
                         "then nnx.update on the model the base was split from), another checkpoint or another "
                         "seed? Load onto the original base, or pass check_base=False to load anyway.")


def _check_state_template(folder: Path, state: Any) -> None:
    """Refuse ``state`` template leaves that would not hold the saved ones exactly (orbax casts to the
    template): another shape, or a dtype the saved one does not widen to safely. Lists each with both."""
    template = _state(state, "lorax.load")
    try:
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(folder)).tree
    except Exception:  # unreadable metadata: the restore reports the damage
        return
    found = {_key_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    problems = []
    for path, like in jax.tree_util.tree_flatten_with_path(template)[0]:
        meta = found.get(_key_names(path))
        if meta is None or not hasattr(meta, "dtype"):
            continue  # a leaf the checkpoint lacks: the restore reports it
        want, shape = np.dtype(meta.dtype), tuple(meta.shape)
        if type(like) in (int, float):  # a Python number takes any width of its kind, exactly
            same, got = want.kind in ("iu" if type(like) is int else "f") and shape == (), type(like).__name__
        else:
            same = np.can_cast(want, like.dtype, "safe") and tuple(like.shape) == shape
            got = f"{like.dtype}{list(like.shape)}"
        if not same:
            problems.append(f"  state{jax.tree_util.keystr(path)}: saved as {want}{list(shape)}, the template "
                            f"holds {got}")
    if problems:
        raise ValueError(f"lorax.load: the state in {str(folder)!r} does not match the template given (restoring "
                         "would round, truncate or reshape it):\n" + "\n".join(problems) + "\nPass a template of "
                         "the saved shapes, with the saved dtypes or wider ones.")


def _key_names(path: tuple) -> tuple[str, ...]:
    """A tree path as names, alike for a NamedTuple's field and the dict key orbax saves it under."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _restore(manager: ocp.CheckpointManager, step: int, item: str, template: Any, problem: str) -> Any:
    """Item ``item`` of ``step``, restored into ``template``; any orbax error becomes ``problem``."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(template)}))[item]
    except Exception as err:  # orbax and tensorstore raise many types for missing or damaged files
        raise ValueError(f"lorax.load: {problem} ({type(err).__name__}: {err}).") from None


def _state(state: Any, who: str) -> Any:
    """``state`` as orbax takes it: NumPy scalars as 0-d arrays; typed keys and other objects refused."""

    def leaf(path, x):
        where = f"{who}: state{jax.tree_util.keystr(path)}"
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(f"{where} is a typed PRNG key; pass jax.random.key_data(key) and rebuild the key "
                            "with jax.random.wrap_key_data.")
        if isinstance(x, np.generic) and not isinstance(x, np.bool_):
            return np.asarray(x)
        if isinstance(x, (jax.Array, np.ndarray)) and not compat.is_tracer(x) or \
                type(x) in (int, float):
            return x
        raise TypeError(f"{where} is {type(x).__name__}; state leaves must be arrays, NumPy scalars, "
                        "ints or floats.")

    plain = jax.tree_util.tree_map_with_path(leaf, state)
    if not jax.tree.leaves(plain):
        raise ValueError(f"{who}: state holds no arrays or numbers.")
    return plain


def _shell(entry: dict, w, arrays: dict | None = None) -> Adapter:
    """The adapter an entry describes; trained arrays as shapes unless given."""
    kind = KINDS[entry["kind"]]
    shell = kind(w, *[None] * len(kind.trained_fields()), scale=entry["scale"], a_axes=tuple(entry["a_axes"]),
                 b_axes=tuple(entry["b_axes"]), stack_axes=tuple(entry["stack_axes"]), dropout=entry["dropout"],
                 init=entry.get("init", "kaiming_uniform"), **_own_fields(kind, entry))
    if arrays is None:
        dtype = jnp.dtype(entry["factor_dtype"])
        arrays = {n: jax.ShapeDtypeStruct(s, dtype) for n, s in shell.expected_shapes(entry["rank"]).items()}
    return shell.replace(**arrays)


def _own_fields(kind: type[Adapter], entry: dict) -> dict[str, Any]:
    """The kind's own static fields from ``entry["own"]``, lists back to tuples; `load` has
    already checked them against the kind (`records.check_record`)."""
    tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v  # noqa: E731
    return {name: tuples(value) for name, value in entry.get("own", {}).items()}


def _abstract(entry: dict, w) -> dict:
    """What orbax restores into: shapes, dtypes and shardings that follow the base weight."""
    # a NumPy base: this process's first device (jax.devices()[0] belongs to process 0 only)
    placed = stored(w)  # a quantized base: where its codes are
    sharding = getattr(placed, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if entry["kind"] == "trainable":
        return {"value": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding)}
    shell = _shell(entry, w)
    shardings = factor_shardings(shell, sharding)
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[k]) for k, x in shell.trained().items()}


def _node(entry: dict, w, arrays: dict):
    if entry["kind"] == "trainable":
        return Trainable(arrays["value"])
    node = _shell(entry, w, arrays)
    node.check(entry["path"])
    if makes_residual(node.init):  # PiSSA/OLoRA: the frozen base is the original W's residual
        node = node.replace(w=residual(node.init, w, node.a_axes, node.b_axes, node.stack_axes, entry["rank"],
                                       node.scale))
    return node
