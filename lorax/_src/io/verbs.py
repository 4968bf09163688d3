"""The public file verbs, `lorax.save` / `lorax.load` and `lorax.peft.save_peft` / `load_peft`: a
tree of single adapters goes to `checkpoint` or `peft`, a bank tree (`lorax.adapters.bank`) to
`bank_files`, a folder per adapter. Above those three, so that none of them needs another."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorax._src.config import LoraConfig
from lorax._src.io import bank_files, checkpoint, peft
from lorax._src.io.files import as_folder
from lorax._src.io.peft_folder import Mapping
from lorax._src.trees import holds_banks


def save(directory: str | Path, params: Any, *, step: int | None = None, keep: int | None = None,
         config: LoraConfig | None = None, overwrite: bool = False, state: Any = None) -> Path:
    """Write the adapters of ``params`` as step ``step`` under ``directory``; returns the step's folder.

    ``step=None`` takes the latest step + 1 (0 in an empty folder). A step that exists, or
    one lower than the latest (a new run writing into an old run's folder), is refused
    unless ``overwrite=True``; steps above it are then kept, and `load` still picks the
    highest. A save writes the whole step to a staging folder first and renames it into
    place (swapping atomically with an old step it replaces), so it either completes or
    leaves the folder as it was; a second process saving to the same folder meanwhile gets
    an error. ``keep`` (an int >= 1) then deletes the steps older than ``step`` that are not
    among the newest ``keep`` (``step`` counted): never the step just written, nor a newer one.
    On a multi-process run every process calls `save`; host-local and NumPy leaves are
    written as replicas (every process must hold the same value), and process 0 alone
    moves folders.
    Each weight's rank, scale and axes are recorded; ``config`` (targets, rsLoRA, ...) too.
    ``state`` is any pytree of arrays, NumPy scalars and Python numbers saved in the same
    step, so a run can resume exactly: optimizer state, step, ``jax.random.key_data(key)``,
    data position (`load` with ``state=`` reads it back).

    A bank tree (`lorax.adapters.bank`) is saved as `lorax.adapters.save` saves it: one such
    folder per adapter under ``directory / name``, all or nothing (no ``state``); ``directory``
    is returned, and `load` reads it back as a bank.

    >>> import jax, jax.numpy as jnp, lorax, tempfile
    >>> fn = lambda p, x: x @ p["w"]
    >>> base = {"w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    >>> folder = lorax.save(tempfile.mkdtemp(), lp, step=3)
    >>> lorax.save(folder.parent, lp).name, lorax.load(folder.parent, base)["w"].rank
    ('4', 2)
    """
    if not holds_banks(params, "lorax.save"):
        return checkpoint.save(directory, params, step=step, keep=keep, config=config, overwrite=overwrite,
                               state=state)
    root = as_folder(directory, "lorax.save", must_exist=False)
    if state is not None:
        raise ValueError("lorax.save: state= is saved with single adapters, not with a bank tree (one folder "
                         "per adapter); save the training state of each adapter's run with it.")
    bank_files.save(root, params, step=step, keep=keep, config=config, overwrite=overwrite)
    return root


def load(directory: str | Path, base: Any, *, step: int | None = None, state: Any = None,
         check_base: bool = True) -> Any:
    """Read adapters saved by `save` onto the plain ``base`` tree (latest step by default).

    Refuses a base that does not fit, listing every mismatch (missing path, other shape
    or dtype), and damaged metadata, naming the file and the field. With ``check_base``,
    also a base whose adapted weights differ from the fingerprint `save` recorded of the
    base the adapters were trained on (a base already merged with them, another checkpoint
    or seed: norm and sampled values must agree to within ``max(1e-4, 2·eps)`` of the weight's
    dtype; across a quantized and a full-precision base only the norm is compared, within 5%);
    checkpoints written before fingerprints load unchecked. Factors are placed after the base weight's sharding.
    Nothing is written. A folder of `save`'s bank layout (no step of its own, a checkpoint
    folder per adapter) is read as `lorax.adapters.load` reads it, into a bank tree. With
    ``state`` (a template of the pytree given to `save`, e.g. a fresh ``tx.init(trainable)``,
    each leaf of the saved shape and of a dtype that holds the saved one exactly), returns
    ``(params, state)``.

    >>> import jax, jax.numpy as jnp, lorax, optax, tempfile
    >>> fn = lambda p, x: x @ p["w"]
    >>> base = {"w": jnp.ones((4, 3))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    >>> tx = optax.adam(1e-3)
    >>> run = {"opt": tx.init(lorax.split(lp)[0]), "step": 7, "key": jax.random.key_data(jax.random.key(1))}
    >>> folder = lorax.save(tempfile.mkdtemp(), lp, state=run)
    >>> params, back = lorax.load(folder.parent, base, state={**run, "step": 0})
    >>> back["step"], bool((back["key"] == run["key"]).all())
    (7, True)
    """
    root = as_folder(directory, "lorax.load", must_exist=True)
    if not isinstance(check_base, bool):
        raise TypeError(f"lorax.load: check_base must be True or False, got {check_base!r}.")
    if step is None and state is None and checkpoint.is_bank_folder(root):
        return bank_files.load(root, base, check_base=check_base)
    return checkpoint.load(root, base, step=step, state=state, check_base=check_base)


def save_peft(directory: str | Path, params: Any, mapping: Mapping, *, base_model_name_or_path: str = "",
              task_type: str = "CAUSAL_LM", initial: Any = None) -> Path:
    """Write the adapters of ``params`` as a PEFT adapter folder; returns its path.

    LoRA and DoRA adapters (not both in one folder: PEFT's ``use_dora`` is one flag), or those
    of one kind with a PEFT format (IA³, LoHa, LoKr, OFT, VeRA: ``peft_type`` ``IA3``, ``LOHA``,
    ``LOKR``, ``OFT``, ``VERA``). A bank tree (`lorax.adapters.bank`) is written in PEFT's
    multi-adapter layout, as `lorax.adapters.save_peft` writes it, and `load_peft` reads such a
    folder back as a bank.
    ``initial``: for adapters made with ``init="pissa"`` or ``"olora"``, whose frozen base
    is a residual, the trainable tree at initialisation (``lorax.split(params)[0]`` right
    after `lorax.init`); the folder then holds plain LoRA adapters of twice the rank that
    apply to the *original* base, as PEFT's own conversion writes them. The weights file's
    metadata (``lorax_base``, which PEFT ignores) holds a fingerprint of each module's base
    weight as the ``[in, out]`` matrix the adapter acts on (the original weight for PiSSA/OLoRA),
    which `load_peft` checks.

    >>> import jax, jax.numpy as jnp, lorax, lorax.peft, tempfile
    >>> fn = lambda p, x: x @ p["q_proj"]["kernel"]
    >>> base = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, base, jnp.ones((1, 4)))
    >>> folder = lorax.peft.save_peft(tempfile.mkdtemp(), lp, [("q_proj/kernel", "q_proj")])
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    if not holds_banks(params, "lorax.peft.save_peft"):
        return peft.save_peft(directory, params, mapping, base_model_name_or_path=base_model_name_or_path,
                              task_type=task_type, initial=initial)
    target = as_folder(directory, "lorax.peft.save_peft", must_exist=False)
    if initial is not None:
        raise ValueError("lorax.peft: initial= converts one PiSSA/OLoRA adapter; export the adapters of a "
                         "bank one by one (lorax.adapters.select) to convert them.")
    bank_files.save_peft(target, params, mapping, base_model_name_or_path=base_model_name_or_path,
                         task_type=task_type)
    return target


def load_peft(directory: str | Path, fn: Callable, params: Any, *args, mapping: Mapping, check_base: bool = True,
              **kwargs) -> Any:
    """Read a PEFT adapter folder onto plain ``params``; returns the LoRA tree.

    ``fn`` and its example arguments (``args``, ``kwargs``) are traced as in `lorax.init`, to
    learn each weight's layout; ``mapping`` names each weight's torch module (a `Mapping`, such
    as `LLAMA`). The config is checked against PEFT's rules (``r`` against the tensors, each
    alpha positive); modules that ``target_modules`` does not list are skipped with a warning,
    as PEFT skips them. Every tensor's shape is checked against the base; tensors for modules
    the base does not have are refused. With ``check_base``, a folder written by `save_peft`
    also refuses a base unlike the one it was saved from (its ``lorax_base`` fingerprints; a
    base already merged with the adapter, another checkpoint or seed); folders without them
    (PEFT's own) load unchecked. A folder holding adapters in sub-folders only (PEFT's
    multi-adapter layout) is read as `lorax.adapters.load_peft` reads it, into a bank tree.

    >>> import jax, jax.numpy as jnp, lorax, lorax.peft, tempfile
    >>> fn = lambda p, x: x @ p["q_proj"]["kernel"]
    >>> base, x = {"q_proj": {"kernel": jnp.ones((4, 3))}}, jnp.ones((1, 4))
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2, alpha=4.0), fn, base, x)
    >>> mapping = [("q_proj/kernel", "q_proj")]
    >>> folder = lorax.peft.save_peft(tempfile.mkdtemp(), lp, mapping)
    >>> back = lorax.peft.load_peft(folder, fn, base, x, mapping=mapping)["q_proj"]["kernel"]
    >>> back.rank, back.scale, bool((back.a == lp["q_proj"]["kernel"].a).all())
    (2, 2.0, True)
    """
    root = as_folder(directory, "lorax.peft.load_peft", must_exist=True)
    if peft.is_bank_folder(root):
        return bank_files.load_peft(root, fn, params, *args, mapping=mapping, check_base=check_base, **kwargs)
    return peft.load_peft(root, fn, params, *args, mapping=mapping, check_base=check_base, **kwargs)
