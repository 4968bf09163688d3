"""The adapter contract: what every node `lorax.init` puts in place of a weight declares.

An adapter kind is a frozen dataclass subclassing `Adapter`. Its fields say what is what:

- ``w``: the frozen base weight (``frozen_field``);
- its trained arrays (``trained_field``), each laid out in terms of W's axes: `layout`
  names, per axis of each trained array, the W axis it stands for or `RANK`;
- static metadata shared by all kinds: ``scale``, ``a_axes`` (W's contracted axes),
  ``b_axes`` (its output axes), ``stack_axes`` (stacked layers), ``dropout``, ``init`` (how
  the factors started: after ``"pissa"`` or ``"olora"`` the frozen ``w`` is the residual
  ``W - s·a₀·b₀`` of the original weight, see `lorax._src.kinds.initializers`).

Everything generic — split/combine, optimizer labels, sharding specs, checkpoints, slicing a
stack inside ``scan``, transposes and casts inside `lorax.lora` — reads these declarations;
a kind adds only its own maths (`delta`, `merged`, its initialisation and its product rules).
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self, TypeVar

import jax
import jax.numpy as jnp

from lorax._src import display
from lorax._src.bases.quantized import dense

Axes = tuple[int, ...]
RANK = "rank"
"""A `Adapter.layout` entry: the adapter's rank axis.

>>> import jax.numpy as jnp, lorax
>>> lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3))).layout()
{'a': (0, 'rank'), 'b': ('rank', 1)}
"""
ADAPTERS = "adapters"
"""A `Adapter.layout` entry: the axis of several named adapters (`LoraBank`).

>>> import jax.numpy as jnp, lorax
>>> tree = {"w": lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))}
>>> lorax.adapters.bank({"x": tree, "y": tree})["w"].layout()["a"]
('adapters', 0, 'rank')
"""


def frozen_field(**kw) -> Any:
    """A frozen array of an adapter kind (its base ``w``, a bank's scales): kept by `lorax.split`'s
    frozen half, never trained; ``kw`` go to `dataclasses.field`.

    >>> import lorax
    >>> lorax.LoraWeight.fields_with("frozen"), lorax.LoraBank.fields_with("frozen")
    (('w',), ('w', 'scales', 'ranks', 'index'))
    """
    return dataclasses.field(metadata=dict(role="frozen"), **kw)


def shared_field() -> Any:
    """A frozen array that many nodes hold alike and that is not derived from the base (VeRA's
    random projections): kept by `lorax.split`'s frozen half, never trained, passed whole to every
    layer of a stack, and written once by checkpoints however many nodes hold it. ``None`` until
    the kind's `Adapter.link` fills it.

    >>> import lorax
    >>> lorax.VeraWeight.shared_fields()
    ('vera_a', 'vera_b')
    """
    return dataclasses.field(default=None, metadata=dict(role="frozen", shared=True))


def trained_field(group: str = "a", **kw) -> Any:
    """A trained array of an adapter kind; ``group`` ("a" or "b") is its LoRA+ learning-rate
    group (`lorax.optimizer`'s ``b_lr_ratio`` applies to group "b"); ``kw`` go to `dataclasses.field`.

    >>> import dataclasses, lorax
    >>> fields = dataclasses.fields(lorax.DoraWeight)
    >>> {f.name: f.metadata["group"] for f in fields if f.metadata.get("role") == "trained"}
    {'a': 'a', 'b': 'b', 'm': 'b'}
    """
    return dataclasses.field(metadata=dict(role="trained", group=group), **kw)


def static_field(default: Any) -> Any:
    """Static metadata of an adapter kind: part of the pytree's structure, not a leaf.

    >>> import dataclasses, lorax
    >>> [f.name for f in dataclasses.fields(lorax.LoraWeight) if f.metadata.get("static")]
    ['scale', 'a_axes', 'b_axes', 'stack_axes', 'dropout', 'init']
    """
    return dataclasses.field(default=default, metadata=dict(static=True))


KINDS: dict[str, type[Adapter]] = {}
"""The registered kinds by name (`register_kind`): what checkpoints record and find again.

>>> from lorax.extend import KINDS
>>> sorted(KINDS)
['dora', 'ia3', 'loha', 'lokr', 'lora', 'lora_bank', 'oft', 'vera']
"""
KindT = TypeVar("KindT", bound=type)


def register_kind(cls: KindT) -> KindT:
    """Make ``cls`` a pytree and a kind that checkpoints and PEFT I/O can name (by ``cls.kind``).

    Use it as a class decorator above ``@dataclasses.dataclass(frozen=True)``; a whole kind is
    the example of `lorax.extend`.

    A name another class holds is refused (a kind defined with a name of its own is the example
    of `dot_parts`):

    >>> import dataclasses, lorax
    >>> from lorax import extend
    >>> extend.KINDS["lora"] is lorax.LoraWeight
    True
    >>> @extend.register_kind
    ... @dataclasses.dataclass(frozen=True, repr=False)
    ... class MyLora(lorax.LoraWeight):
    ...     kind = "lora"
    Traceback (most recent call last):
    ValueError: register_kind: the kind 'lora' is LoraWeight's already; give MyLora a name of its own.
    """
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_kind: {cls.__name__} needs a class attribute kind, its name (a str), got {name!r}.")
    if KINDS.get(name, cls) is not cls:
        raise ValueError(f"register_kind: the kind {name!r} is {KINDS[name].__name__}'s already; give "
                         f"{cls.__name__} a name of its own.")
    KINDS[name] = cls
    return jax.tree_util.register_dataclass(cls)


def creatable(cls: type) -> bool:
    """Whether `lorax.init` can make adapters of kind ``cls``: it implements `Adapter.create` and
    holds one adapter per weight (a bank is built from several by `lorax.adapters.bank`)."""
    return not cls.several and getattr(cls.create, "__func__", None) is not Adapter.create.__func__


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The base of every adapter kind: a frozen dataclass whose fields declare what is what.

    Everything generic in lorax (split and combine, the optimizer's labels, sharding specs,
    checkpoints, slicing a stack inside ``scan``, transposes and casts inside `lorax.lora`)
    reads these declarations; a kind adds only its own maths (`merged`, `create`) and its
    product rules. `LoraWeight`, `DoraWeight` and `LoraBank` are the built-in kinds.

    Attributes:
      w: the frozen base weight (a ``frozen_field``): an array or a `QuantizedArray`.
      scale: the update's scale (``alpha / rank``).
      a_axes: W's contracted (input) axes.
      b_axes: W's output axes.
      stack_axes: W's axes of stacked layers (``nn.scan``): one adapter per layer.
      dropout: the dropout rate on the adapter's input (on when `lorax.lora` gets ``rng``).
      init: how the factors started (``"kaiming_uniform"``, ``"gaussian"``, ``"pissa"``,
        ``"olora"``, ...); after ``"pissa"`` or ``"olora"`` the frozen ``w`` is the residual
        ``W - s·a₀·b₀`` of the original weight.
      kind: the kind's name in checkpoints (class constant: ``"lora"``, ``"dora"``, ...).
      several: True for a kind holding several named adapters (`LoraBank`), saved one by one.
      bounded_rank: whether `lorax.init` refuses a rank above ``min(fan_in, fan_out)`` (True:
        a low-rank kind; IA³ has no rank, LoKr's rank bounds its blocks).
      ranked: whether the kind has a rank (False for IA³, whose `rank` is 0).
      peft: a `lorax.extend.PeftFormat`: how `lorax.peft` writes and reads the kind (None: not
        at all, or LoRA's and DoRA's own format).

    A kind's trained arrays are ``trained_field``s, each laid out in terms of W's axes
    (`layout`). All the static fields are keyword-only.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=0.5)
    >>> isinstance(lw, lorax.Adapter), lw.kind, lw.trained_fields(), lw.frozen_fields()
    (True, 'lora', ('a', 'b'), ('w',))
    >>> lw.layout()  # a: W's axis 0, then the rank; b: the rank, then W's axis 1
    {'a': (0, 'rank'), 'b': ('rank', 1)}
    >>> lw.rank, lw.shape, lw.dtype
    (2, (4, 3), dtype('float32'))
    """

    kind: ClassVar[str]
    several: ClassVar[bool] = False  # holds several named adapters (`LoraBank`): saved one by one
    bounded_rank: ClassVar[bool] = True  # `lorax.init` refuses a rank above min(fan_in, fan_out)
    ranked: ClassVar[bool] = True  # its layout has a `RANK` axis (IA³'s has none: `rank` is 0)
    peft: ClassVar[Any] = None  # a `PeftFormat`: how the kind travels as a PEFT folder (LoRA/DoRA: lorax.peft's own)

    w: Any = frozen_field()
    _: dataclasses.KW_ONLY
    scale: float = static_field(1.0)
    a_axes: Axes = static_field((0,))
    b_axes: Axes = static_field((1,))
    stack_axes: Axes = static_field(())
    dropout: float = static_field(0.0)
    init: str = static_field("kaiming_uniform")

    # ------------------------------------------------------------------ declarations

    @classmethod
    def fields_with(cls, role: str) -> tuple[str, ...]:
        """The names of the fields declared with ``role`` (``"trained"`` or ``"frozen"``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") == role)

    @classmethod
    def trained_fields(cls) -> tuple[str, ...]:
        """The trained arrays' field names (``("a", "b")`` for `LoraWeight`)."""
        return cls.fields_with("trained")

    @classmethod
    def frozen_fields(cls) -> tuple[str, ...]:
        """The frozen arrays' field names (``("w",)`` for `LoraWeight`)."""
        return cls.fields_with("frozen")

    @classmethod
    def shared_fields(cls) -> tuple[str, ...]:
        """The frozen fields declared with `shared_field` (none for most kinds)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("shared"))

    @classmethod
    def array_fields(cls) -> tuple[str, ...]:
        """The frozen then the trained field names: every array the node holds."""
        return cls.frozen_fields() + cls.trained_fields()

    @classmethod
    def group(cls, name: str) -> str:
        """The LoRA+ learning-rate group ("a" or "b") of trained field ``name``.

        >>> import lorax
        >>> [lorax.DoraWeight.group(name) for name in lorax.DoraWeight.trained_fields()]
        ['a', 'b', 'b']
        """
        return {f.name: f.metadata.get("group", "a") for f in dataclasses.fields(cls)}[name]

    def layout(self) -> dict[str, tuple[int | str, ...]]:
        """Per trained field, the W axis (or `RANK`, or `ADAPTERS`) behind each of its axes.

        The one method every kind must write; shapes, stacking, sharding and checkpoints are
        derived from it. See the class example.
        """
        raise NotImplementedError(_unwritten(self, "layout"))

    # ------------------------------------------------------------------ derived

    @property
    def rank(self) -> int:
        """The adapter's rank, read from the first trained array with a `RANK` axis; 0 for a kind
        without one (IA³ scales W by a vector)."""
        for name, entries in self.layout().items():
            if RANK in entries:
                return getattr(self, name).shape[entries.index(RANK)]
        return 0

    def axis(self, field: str, name: str) -> int:
        """Where the named axis (`RANK`, `ADAPTERS`) sits in the array ``field``, read from the
        layout.

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.ones((5, 4, 3)), jnp.ones((5, 4, 2)), jnp.zeros((5, 2, 3)),
        ...                       a_axes=(1,), b_axes=(2,), stack_axes=(0,))
        >>> lw.axis("a", lorax.extend.RANK), lw.axis("b", lorax.extend.RANK)
        (2, 1)
        """
        return self.layout()[field].index(name)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this node stands for (``w``'s)."""
        return tuple(self.w.shape)

    @property
    def dtype(self):
        """The dtype of the weight this node stands for (``w``'s)."""
        return self.w.dtype

    @property
    def meta(self) -> dict:
        """The static fields: what two halves of one split must agree on."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("static")}

    def to_matrices(self, x: jax.Array) -> jax.Array:
        """``x`` laid out like ``w`` as ``[*stack, fan_in, fan_out]`` matrices (W's contracted
        axes flattened row-major into ``fan_in``, its output axes into ``fan_out``).

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.ones((2, 4, 3)), jnp.ones((4, 1)), jnp.ones((1, 2, 3)),
        ...                       a_axes=(1,), b_axes=(0, 2))
        >>> m = lw.to_matrices(jnp.arange(24.0).reshape(2, 4, 3))
        >>> m.shape, bool((lw.from_matrices(m) == jnp.arange(24.0).reshape(2, 4, 3)).all())
        ((4, 6), True)
        """
        return as_matrices(x, self.a_axes, self.b_axes, self.stack_axes)

    def from_matrices(self, m: jax.Array) -> jax.Array:
        """``[*stack, fan_in, fan_out]`` matrices laid out like ``w`` (`to_matrices` undone)."""
        order = (*self.stack_axes, *self.a_axes, *self.b_axes)
        x = m.reshape(*(self.shape[i] for i in order))
        return jnp.transpose(x, [order.index(i) for i in range(len(order))])

    def own_meta(self) -> dict[str, Any]:
        """The static fields a kind adds to `Adapter`'s (IA³'s ``on_input``, LoKr's block shapes):
        what checkpoints record beside the shared ones, to rebuild the node.

        >>> import jax.numpy as jnp, lorax
        >>> lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3))).own_meta()
        {}
        """
        shared = {f.name for f in dataclasses.fields(Adapter)}
        return {name: value for name, value in self.meta.items() if name not in shared}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The kind's own `LoraConfig` ``options`` checked (an error names the option) and completed
        with their defaults: what ``spec.options`` gives `create`. The base takes none.

        >>> import lorax
        >>> lorax.LoraWeight.check_options({"foo": 1})
        Traceback (most recent call last):
        ValueError: LoraConfig: the kind 'lora' takes no options, got ['foo'].
        """
        if options:
            raise ValueError(f"LoraConfig: the kind {cls.kind!r} takes no options, got {sorted(options)}.")
        return {}

    def trained(self) -> dict[str, Any]:
        """The trained arrays by field name; a kind's optional array that this node does not
        hold (None, and absent from `layout`) is left out."""
        return {name: getattr(self, name) for name in self.trained_fields() if getattr(self, name) is not None}

    def axis_sizes(self, rank: int) -> dict[str, int]:
        """The size of each layout entry that is not an axis of W (`RANK`, ...)."""
        return {RANK: rank}

    def expected_shapes(self, rank: int | None = None) -> dict[str, tuple[int, ...]]:
        """The shape each trained field must have to fit ``w``."""
        sizes = self.axis_sizes(self.rank if rank is None else rank)
        return {name: tuple(self.w.shape[e] if isinstance(e, int) else sizes[e] for e in entries)
                for name, entries in self.layout().items()}

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each trained array in one layer of the stack (the stack axes taken off).

        >>> import jax.numpy as jnp, lorax
        >>> lorax.LoraWeight(jnp.ones((5, 4, 3)), jnp.ones((5, 4, 2)), jnp.zeros((5, 2, 3)),
        ...                  a_axes=(1,), b_axes=(2,), stack_axes=(0,)).layer_shapes()
        {'a': (4, 2), 'b': (2, 3)}
        """
        return {name: shape[len(self.stack_axes):] for name, shape in self.expected_shapes().items()}

    def check(self, path: str = "") -> None:
        """Raise ``ValueError`` naming ``path`` if the trained arrays do not fit ``w``."""
        where = f"{type(self).__name__} at {path!r}" if path else type(self).__name__
        axes = sorted(self.a_axes + self.b_axes + self.stack_axes)
        if axes != list(range(len(self.w.shape))):
            raise ValueError(
                f"{where}: a_axes={self.a_axes}, b_axes={self.b_axes} and stack_axes="
                f"{self.stack_axes} must split the {len(self.w.shape)} axes of w {self.shape} "
                "exactly once each."
            )
        want = self.expected_shapes()
        got = {name: None if getattr(self, name) is None else tuple(getattr(self, name).shape) for name in want}
        if got != want:
            show = lambda d: " and ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
            raise ValueError(f"{where}: factors do not fit w {self.shape}: got {show(got)}, "
                             f"expected {show(want)}.")

    def num_adapter_params(self) -> int:
        """The number of trained parameters (what `lorax.explain` counts)."""
        return sum(math.prod(x.shape) for x in self.trained().values())

    def subscripts(self, letters: str = string.ascii_letters) -> dict[str, str]:
        """Einsum subscripts of ``w`` (key ``"w"``) and of each trained field; the rank
        takes the first letter after W's, the adapters axis (`ADAPTERS`) the next.

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
        >>> lw.subscripts()
        {'w': 'ab', 'a': 'ac', 'b': 'cb'}
        """
        ndim = len(self.a_axes) + len(self.b_axes) + len(self.stack_axes)
        w_sub = letters[:ndim]
        extra = {RANK: letters[ndim], ADAPTERS: letters[ndim + 1]}
        subs = {name: "".join(w_sub[e] if isinstance(e, int) else extra[e] for e in entries)
                for name, entries in self.layout().items()}
        return {"w": w_sub, **subs}

    # ------------------------------------------------------------------ the maths a kind supplies

    def delta(self) -> jax.Array:
        """``merged() - w`` laid out like ``w``."""
        return self.merged() - dense(self.w)

    def merged(self) -> jax.Array:
        """The plain weight this adapter stands for, in ``w``'s dtype."""
        raise NotImplementedError(_unwritten(self, "merged"))

    @classmethod
    def create(cls, key: jax.Array, spec: Any, w: jax.Array, use: Any) -> Adapter:
        """A new adapter for ``w``, leaving the model's outputs unchanged: what `lorax.init` calls.

        Args:
          key: a PRNG key for the factors' initialisation.
          spec: what `LoraConfig` asks for this weight, resolved: ``spec.kind``, ``spec.rank``,
            ``spec.scale``, ``spec.init``, ``spec.dropout``, and ``spec.dtype_for(w.dtype)``,
            the factors' dtype.
          w: the weight (an array or a `QuantizedArray`).
          use: how the model uses ``w``, read from its jaxpr: ``use.primitive``,
            ``use.a_axes`` (contracted), ``use.b_axes`` (outputs), ``use.stack_axes``.
        """
        raise NotImplementedError(_unwritten(cls, "create"))

    @classmethod
    def link(cls, nodes: dict[str, Any]) -> dict[str, Any]:
        """The kind's nodes of one `lorax.init` call (by path), once all are created: where a
        kind builds the arrays they share (`shared_field`). The default returns them as they are.

        >>> import jax, jax.numpy as jnp, lorax
        >>> fn = lambda p, x: x @ p["w1"] @ p["w2"]
        >>> params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2))}
        >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(kind="vera", rank=2), fn, params, jnp.ones((1, 4)))
        >>> lp["w1"].vera_a is lp["w2"].vera_a, lp["w1"].vera_a.shape  # one projection, as wide as the widest
        (True, (2, 8))
        """
        return nodes

    @property
    def factor_dtype(self):
        """The dtype of the trained arrays."""
        return next(iter(self.trained().values())).dtype

    def unmerged(self, merged: jax.Array, path: str = "") -> jax.Array:
        """The ``w`` whose merge is ``merged``; kinds whose merge cannot be undone refuse."""
        raise ValueError(f"lorax.unmerge: {path!r} is a {type(self).__name__}, whose merge does not "
                         "add a delta independent of w, so w cannot be recovered; keep the unmerged tree.")

    def __repr__(self) -> str:
        return display.node_repr(self, kind=self.kind, frozen=self.frozen_fields())

    def __treescope_repr__(self, path, subtree_renderer):
        return display.node_treescope(self, path, subtree_renderer, kind=self.kind, frozen=self.frozen_fields())

    # ------------------------------------------------------------------ generic reshaping

    def replace(self, **changes) -> Self:
        """A copy with the given fields changed (`dataclasses.replace`).

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)))
        >>> lw.replace(scale=2.0).scale, lw.scale
        (2.0, 1.0)
        """
        return dataclasses.replace(self, **changes)

    def map_trained(self, fn: Callable[[str, jax.Array, tuple], jax.Array], **changes) -> Self:
        """Apply ``fn(name, array, layout)`` to each trained array (``layout``: that array's
        `layout` entries); ``changes`` replace other fields at the same time.

        >>> import jax.numpy as jnp, lorax
        >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)))
        >>> lw.map_trained(lambda name, x, layout: x[..., :1] if layout[-1] == "rank" else x[:1]).rank
        1
        """
        layout = self.layout()
        return self.replace(**{n: fn(n, getattr(self, n), layout[n]) for n in layout}, **changes)

    def relayout(self, new_position: dict[int, int], **changes) -> Self:
        """The same adapter for a ``w`` whose axes moved (``old -> new``; axes left out were
        squeezed away); trained arrays keep their layout, only the axis numbers change."""
        remap = lambda axes: tuple(new_position[i] for i in axes if i in new_position)  # noqa: E731
        return self.replace(a_axes=remap(self.a_axes), b_axes=remap(self.b_axes),
                            stack_axes=remap(self.stack_axes), **changes)

    def take_stack(self, index_for: Callable[[int], Any], **changes) -> Self:
        """Index each trained array along its stack axes: ``index_for(w_axis)`` gives the
        index (a slice, or an int to drop the axis) for each stacked axis of W."""

        def take(name, x, entries):
            index = tuple(index_for(e) if e in self.stack_axes else slice(None) for e in entries)
            return x[index]

        return self.map_trained(take, **changes)

    def stacked_fields(self) -> tuple[str, ...]:
        """The array fields that carry W's leading stack axis first (``w`` and the trained
        arrays laid out from it): what ``scan`` slices layer by layer; others pass whole."""
        lead = self.stack_axes[:1]
        return ("w", *(n for n, entries in self.layout().items() if entries[:1] == lead and lead))

    def unstacked(self, **changes) -> Self:
        """One layer of a stack sliced off axis 0 (inside ``scan``): axis numbers shift down."""
        down = lambda axes: tuple(i - 1 for i in axes)  # noqa: E731
        return self.replace(a_axes=down(self.a_axes), b_axes=down(self.b_axes),
                            stack_axes=down(self.stack_axes[1:]), **changes)

    def cast(self, dtype) -> dict[str, jax.Array]:
        """The trained arrays by field name, cast to ``dtype``."""
        return {n: x.astype(dtype) for n, x in self.trained().items()}


class Additive(Adapter):
    """A kind whose weight is ``W + delta()``, the update independent of ``W``: it writes `delta`,
    and `merged` and `unmerged` follow (LoHa, LoKr).

    >>> import dataclasses, jax.numpy as jnp, lorax
    >>> from lorax import extend
    >>> @extend.register_kind
    ... @dataclasses.dataclass(frozen=True, repr=False)
    ... class Bias(extend.Additive):                 # W + 1·vᵀ
    ...     kind = "bias-example"
    ...     v: jnp.ndarray = extend.trained_field()
    ...     def layout(self):
    ...         return {"v": (*self.stack_axes, *self.b_axes)}
    ...     def delta(self):
    ...         return jnp.broadcast_to(self.v, self.shape)
    >>> node = Bias(jnp.zeros((2, 3)), jnp.array([1.0, 2.0, 3.0]))
    >>> lorax.merge(node).tolist(), node.unmerged(lorax.merge(node)).tolist()
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> del extend.KINDS["bias-example"]
    """

    def delta(self) -> jax.Array:
        raise NotImplementedError(_unwritten(self, "delta"))

    def merged(self) -> jax.Array:
        w = dense(self.w)
        return (w + self.delta().astype(w.dtype)).astype(w.dtype)

    def unmerged(self, merged: jax.Array, path: str = "") -> jax.Array:
        delta = self.replace(w=merged).delta()  # from the trainable half too, whose w is None
        return (merged - delta.astype(merged.dtype)).astype(merged.dtype)


def _unwritten(node_or_kind: Any, method: str) -> str:
    """Why a base class's method raised: the kind did not write it (or a base class was used as one)."""
    cls = node_or_kind if isinstance(node_or_kind, type) else type(node_or_kind)
    return (f"{cls.__name__} does not write {method}(): an adapter kind subclasses lorax.extend.Adapter (or "
            "Additive, or LowRank), writes layout(), merged() or delta(), and create() for lorax.init; a base class "
            "is not a kind itself.")


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def fan_in_out(w_shape, a_axes: Sequence[int], b_axes: Sequence[int]) -> tuple[int, int]:
    return math.prod(w_shape[i] for i in a_axes), math.prod(w_shape[i] for i in b_axes)


def as_matrices(w: jax.Array, a_axes: Axes, b_axes: Axes, stack_axes: Axes) -> jax.Array:
    """``w`` as ``[*stack, in, out]`` matrices (contracted axes flattened into ``in``)."""
    w = jnp.transpose(w, (*stack_axes, *a_axes, *b_axes))
    stack = w.shape[: len(stack_axes)]
    fan_in, fan_out = fan_in_out(w.shape, range(len(stack), len(stack) + len(a_axes)),
                                 range(len(stack) + len(a_axes), w.ndim))
    return w.reshape(*stack, fan_in, fan_out)
