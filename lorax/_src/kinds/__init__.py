"""Adapter kinds, one module each: its node (an `Adapter`) and its product rules.

Adding a kind is a new module here, imported below, that defines a registered `Adapter`
subclass (`register_kind`), its ``create`` classmethod and its ``apply`` handlers."""

from lorax._src.kinds.bank import LoraBank as LoraBank
from lorax._src.kinds.dora import DoraWeight as DoraWeight
from lorax._src.kinds.frozen import FrozenBase as FrozenBase
from lorax._src.kinds.ia3 import Ia3Weight as Ia3Weight
from lorax._src.kinds.loha import LohaWeight as LohaWeight
from lorax._src.kinds.lokr import LokrWeight as LokrWeight
from lorax._src.kinds.lora import LoraWeight as LoraWeight
from lorax._src.kinds.oft import OftWeight as OftWeight
from lorax._src.kinds.vera import VeraWeight as VeraWeight
