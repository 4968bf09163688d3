"""Several named adapters of one base: banks, per-example routing, weighted combinations."""

from lorax._src.adapters import add as add
from lorax._src.adapters import bank as bank
from lorax._src.adapters import base as base
from lorax._src.adapters import delete as delete
from lorax._src.adapters import index_of as index_of
from lorax._src.adapters import names as names
from lorax._src.adapters import rename as rename
from lorax._src.adapters import route as route
from lorax._src.adapters import select as select
from lorax._src.bank_files import load as load
from lorax._src.bank_files import load_peft as load_peft
from lorax._src.bank_files import save as save
from lorax._src.bank_files import save_peft as save_peft
from lorax._src.kinds.bank import BASE as BASE
from lorax._src.weighted import weighted as weighted

__all__ = ["BASE", "add", "bank", "base", "delete", "index_of", "load", "load_peft", "names", "rename", "route",
           "save", "save_peft", "select", "weighted"]
