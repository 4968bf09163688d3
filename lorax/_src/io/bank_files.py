"""A bank tree on disk: one lorax checkpoint, or one PEFT adapter folder, per adapter name.

PEFT's layout for several adapters: the adapter named ``"default"`` in the folder itself,
every other one in a sub-folder named after it (what ``PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained(..., adapter_name=)`` / ``load_adapter(folder / name, name)`` read).

A save writes every adapter into a staged copy of the folder and swaps it in at once
(`lorax._src.io.files.staged_folder`): any refusal or failure, for any adapter, leaves the
folder as it was, and a finished save holds every adapter's new files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lorax._src.banks.verbs import bank, check_name, names, select
from lorax._src.io import checkpoint, peft
from lorax._src.io.files import as_folder, staged_folder
from lorax._src.io.peft_config import CONFIG_FILE

DEFAULT = "default"  # PEFT's name for the adapter saved in the folder itself


def save(directory: str | Path, params: Any, **kwargs) -> dict[str, Path]:
    """Save each adapter of a bank tree with `lorax.save` under ``directory / name``;
    ``kwargs`` go to `lorax.save`. Returns the step folder of each adapter.

    All or nothing: if `lorax.save` refuses any adapter (a step rule, say) or a write fails,
    no adapter's folder changes.

    >>> import jax, jax.numpy as jnp, lorax, tempfile
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> folder = tempfile.mkdtemp()
    >>> _ = lorax.adapters.save(folder, lorax.adapters.bank({"math": one(0), "code": one(1)}))
    >>> lorax.adapters.names(lorax.adapters.load(folder, base))
    ('code', 'math')
    """
    who = "lorax.adapters.save"
    root = as_folder(directory, who, must_exist=False)
    trees = _selected(params, who, lambda name: root / name)
    with staged_folder(root, who, primary=jax.process_index() == 0, agree=_agreement()) as staged:
        steps = {name: checkpoint.save(staged / name, tree, **kwargs) for name, tree in trees.items()}
    return {name: root / name / step.name for name, step in steps.items()}


def load(directory: str | Path, base: Any, *, only: Sequence[str] | None = None, check_base: bool = True) -> Any:
    """A bank tree of the adapters saved by `save` under ``directory`` (each sub-folder's
    latest step; ``only`` picks and orders them; otherwise sorted by name) on the plain ``base``.
    ``check_base``: as `lorax.load`, each adapter's recorded base fingerprint must match ``base``.

    >>> import jax, jax.numpy as jnp, lorax, tempfile
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> folder = tempfile.mkdtemp()
    >>> _ = lorax.adapters.save(folder, lorax.adapters.bank({"math": one(0), "code": one(1), "sql": one(2)}))
    >>> lorax.adapters.names(lorax.adapters.load(folder, base, only=["sql", "math"]))
    ('sql', 'math')
    """
    root = as_folder(directory, "lorax.adapters.load", must_exist=True)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    chosen = _choose(found, only, root, "lorax.adapters.load")
    return bank({name: checkpoint.load(root / name, base, check_base=check_base) for name in chosen})


def save_peft(directory: str | Path, params: Any, mapping: peft.Mapping, **kwargs) -> dict[str, Path]:
    """Export each adapter of a bank tree as a PEFT adapter folder, in PEFT's multi-adapter
    layout (``"default"`` in ``directory``, any other name in ``directory / name``);
    ``kwargs`` go to `lorax.peft.save_peft`. Returns each adapter's folder. All or nothing:
    if any adapter is refused (its mapping, a scale PEFT cannot hold, ...) or a write fails,
    the folder is left as it was; other sub-folders in it are kept.

    >>> import jax, jax.numpy as jnp, lorax, tempfile, os
    >>> fn = lambda p, x: x @ p["q_proj"]["kernel"]
    >>> base, x = {"q_proj": {"kernel": jnp.ones((4, 3))}}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> folder = tempfile.mkdtemp()
    >>> params = lorax.adapters.bank({"default": one(0), "code": one(1)})
    >>> _ = lorax.adapters.save_peft(folder, params, [("q_proj/kernel", "q_proj")])
    >>> sorted(os.listdir(folder))  # "default" in the folder itself, "code" beside its files
    ['adapter_config.json', 'adapter_model.safetensors', 'code']
    """
    who = "lorax.adapters.save_peft"
    root = as_folder(directory, who, must_exist=False)
    folder = lambda top, name: top if name == DEFAULT else top / name  # noqa: E731
    trees = _selected(params, who, lambda name: folder(root, name))
    with staged_folder(root, who) as staged:
        for name in sorted(trees, key=lambda n: n != DEFAULT):  # the root first: its swap keeps sub-folders
            peft.save_peft(folder(staged, name), trees[name], mapping, **kwargs)
    return {name: folder(root, name) for name in trees}


def _selected(params: Any, who: str, place: Callable[[str], Path]) -> dict[str, Any]:
    """Each adapter of the bank tree ``params`` as a single-adapter tree, by name; refuses a name
    that is not one plain folder name, or whose folder ``place(name)`` is taken by a file."""
    chosen = names(params)
    for name in chosen:
        check_name(name, who)
        if place(name).exists() and not place(name).is_dir():
            raise ValueError(f"{who}: {str(place(name))!r} is a file; adapter {name!r} needs a folder there.")
    return {name: select(params, name) for name in chosen}


def _agreement() -> Callable[[bool], bool] | None:
    """On a multi-process run, a barrier that gives every process process 0's answer."""
    if jax.process_count() == 1:
        return None
    return lambda ok: bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))


def load_peft(directory: str | Path, fn: Callable, params: Any, *args, mapping: peft.Mapping,
              only: Sequence[str] | None = None, **kwargs) -> Any:
    """A bank tree of the PEFT adapters in ``directory`` (PEFT's multi-adapter layout: the
    folder itself is ``"default"`` when it holds an adapter, each sub-folder holding one is
    named after it) read onto the plain ``params`` as `lorax.peft.load_peft` reads one;
    ``only`` picks and orders them, ``kwargs`` go to `lorax.peft.load_peft`.

    >>> import jax, jax.numpy as jnp, lorax, tempfile
    >>> fn = lambda p, x: x @ p["q_proj"]["kernel"]
    >>> base, x = {"q_proj": {"kernel": jnp.ones((4, 3))}}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> folder, mapping = tempfile.mkdtemp(), [("q_proj/kernel", "q_proj")]
    >>> _ = lorax.adapters.save_peft(folder, lorax.adapters.bank({"default": one(0), "code": one(1)}), mapping)
    >>> lorax.adapters.names(lorax.adapters.load_peft(folder, fn, base, x, mapping=mapping))
    ('default', 'code')
    """
    root = as_folder(directory, "lorax.adapters.load_peft", must_exist=True)
    found = [DEFAULT] if (root / CONFIG_FILE).is_file() else []
    found += sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file() and p.name != DEFAULT)
    chosen = _choose(found, only, root, "lorax.adapters.load_peft")
    folder = lambda name: root if name == DEFAULT else root / name  # noqa: E731
    return bank({name: peft.load_peft(folder(name), fn, params, *args, mapping=mapping, **kwargs)
                 for name in chosen})


def _choose(found: list[str], only: Sequence[str] | None, root: Path, who: str) -> list[str]:
    if not found:
        raise ValueError(f"{who}: {str(root)!r} holds no adapter folders.")
    if only is None:
        return found
    if isinstance(only, str) or not isinstance(only, Sequence):
        raise TypeError(f"{who}: only must be a list of adapter names, got {only!r} ({type(only).__name__}).")
    for name in only:
        check_name(name, who)
    if len(set(only)) != len(only):
        raise ValueError(f"{who}: only names an adapter twice: {list(only)}.")
    missing = [n for n in only if n not in found]
    if missing or not only:
        raise ValueError(f"{who}: {str(root)!r} has no adapters {missing or list(only)}; it holds {found}.")
    return list(only)
