"""A bank tree on disk: one lorax checkpoint, or one PEFT adapter folder, per adapter name.

PEFT's layout for several adapters: the adapter named ``"default"`` in the folder itself,
every other one in a sub-folder named after it (what ``PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained(..., adapter_name=)`` / ``load_adapter(folder / name, name)`` read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorax._src import checkpoint, peft
from lorax._src.adapters import bank, names, select
from lorax._src.files import as_folder
from lorax._src.peft_config import CONFIG_FILE

DEFAULT = "default"  # PEFT's name for the adapter saved in the folder itself


def save(directory: str | Path, params: Any, **kwargs) -> dict[str, Path]:
    """Save each adapter of a bank tree with `lorax.save` under ``directory / name``;
    ``kwargs`` go to `lorax.save`. Returns the step folder of each adapter.

    >>> import jax, jax.numpy as jnp, lorax, tempfile
    >>> fn = lambda p, x: x @ p["w"]
    >>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((1, 4))
    >>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
    >>> folder = tempfile.mkdtemp()
    >>> _ = lorax.adapters.save(folder, lorax.adapters.bank({"math": one(0), "code": one(1)}))
    >>> lorax.adapters.names(lorax.adapters.load(folder, base))
    ('code', 'math')
    """
    root = as_folder(directory, "lorax.adapters.save", must_exist=False)
    return {name: checkpoint.save(root / name, select(params, name), **kwargs) for name in names(params)}


def load(directory: str | Path, base: Any, *, only: Sequence[str] | None = None) -> Any:
    """A bank tree of the adapters saved by `save` under ``directory`` (each sub-folder's
    latest step; ``only`` picks and orders them; otherwise sorted by name) on the plain ``base``."""
    root = as_folder(directory, "lorax.adapters.load", must_exist=True)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    chosen = _choose(found, only, root, "lorax.adapters.load")
    return bank({name: checkpoint.load(root / name, base) for name in chosen})


def save_peft(directory: str | Path, params: Any, mapping: peft.Mapping, **kwargs) -> dict[str, Path]:
    """Export each adapter of a bank tree as a PEFT adapter folder, in PEFT's multi-adapter
    layout (``"default"`` in ``directory``, any other name in ``directory / name``);
    ``kwargs`` go to `lorax.peft.save_peft`. Returns each adapter's folder."""
    root = as_folder(directory, "lorax.adapters.save_peft", must_exist=False)
    order = sorted(names(params), key=lambda n: n != DEFAULT)  # the root first: its swap keeps sub-folders
    return {name: peft.save_peft(root if name == DEFAULT else root / name, select(params, name), mapping, **kwargs)
            for name in order}


def load_peft(directory: str | Path, fn: Callable, params: Any, *args, mapping: peft.Mapping,
              only: Sequence[str] | None = None, **kwargs) -> Any:
    """A bank tree of the PEFT adapters in ``directory`` (PEFT's multi-adapter layout: the
    folder itself is ``"default"`` when it holds an adapter, each sub-folder holding one is
    named after it) read onto the plain ``params`` as `lorax.peft.load_peft` reads one."""
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
    missing = [n for n in only if n not in found]
    if missing or not only:
        raise ValueError(f"{who}: {str(root)!r} has no adapters {missing or list(only)}; it holds {found}.")
    return list(only)
