"""Several named adapters of one base: banks, per-example routing, weighted combinations.

A *bank tree* is the base's tree with a `lorax.LoraBank` in place of every weight some adapter
adapts: `bank` builds one from single-adapter trees, `select` gives one adapter back as an
ordinary tree, `route` picks an adapter per example inside `lorax.lora`, and `save` / `load`,
`save_peft` / `load_peft` keep one folder per adapter.

>>> import jax, jax.numpy as jnp, lorax
>>> fn = lambda p, x: x @ p["w"]
>>> base, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
>>> one = lambda seed: lorax.init(jax.random.key(seed), lorax.LoraConfig(rank=2), fn, base, x)
>>> params = lorax.adapters.bank({"math": one(0), "code": one(1)})
>>> lorax.adapters.names(params), lorax.lora(fn)(lorax.adapters.route(params, ["code", None]), x).shape
(('math', 'code'), (2, 3))
"""

from lorax._src.banks.verbs import add as add
from lorax._src.banks.verbs import bank as bank
from lorax._src.banks.verbs import base as base
from lorax._src.banks.verbs import delete as delete
from lorax._src.banks.verbs import index_of as index_of
from lorax._src.banks.verbs import names as names
from lorax._src.banks.verbs import rename as rename
from lorax._src.banks.verbs import route as route
from lorax._src.banks.verbs import select as select
from lorax._src.banks.weighted import weighted as weighted
from lorax._src.io.bank_files import load as load
from lorax._src.io.bank_files import load_peft as load_peft
from lorax._src.io.bank_files import save as save
from lorax._src.io.bank_files import save_peft as save_peft
from lorax._src.kinds.bank import BASE as BASE

__all__ = ["BASE", "add", "bank", "base", "delete", "index_of", "load", "load_peft", "names", "rename", "route",
           "save", "save_peft", "select", "weighted"]
