"""The pytree nodes that `lorax.init` puts into a parameter tree."""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp

from lorax._src import display

Axes = tuple[int, ...]


def factor_shapes(w_shape, rank: int, a_axes: Axes, b_axes: Axes, stack_axes: Axes = ()):
    """The shapes of ``a`` and ``b`` for a weight of ``w_shape``: ``(*stack, *a_axes, rank)``
    and ``(*stack, rank, *b_axes)``.

    >>> factor_shapes((2, 8, 4), 3, a_axes=(1,), b_axes=(2,), stack_axes=(0,))
    ((2, 8, 3), (2, 3, 4))
    """
    dims = lambda axes: tuple(w_shape[i] for i in axes)  # noqa: E731
    stack = dims(stack_axes)
    return (*stack, *dims(a_axes), rank), (*stack, rank, *dims(b_axes))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight ``w`` with a trainable low-rank update ``scale * a @ b``.

    ``a`` holds W's *contracted* axes (``a_axes``) and ``b`` its *output* axes
    (``b_axes``); axes of stacked layers (``stack_axes``, e.g. from ``nn.scan``)
    lead both factors, giving one independent adapter per layer:
    ``a.shape == (*stack, *a_axes, rank)`` and ``b.shape == (*stack, rank, *b_axes)``.
    Axis numbers index ``w``. ``dropout`` is the rate applied to the adapter's input.

    >>> import jax.numpy as jnp, lorax
    >>> lw = lorax.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
    ...                       scale=0.5, a_axes=(0,), b_axes=(1,))
    >>> lw.rank, lorax.merge(lw).shape
    (2, (4, 3))
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    a_axes: Axes = dataclasses.field(default=(0,), metadata=dict(static=True))
    b_axes: Axes = dataclasses.field(default=(1,), metadata=dict(static=True))
    stack_axes: Axes = dataclasses.field(default=(), metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def expected_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes ``a`` and ``b`` must have to fit ``w``."""
        return factor_shapes(self.w.shape, self.a.shape[-1], self.a_axes, self.b_axes, self.stack_axes)

    def check(self, path: str = "") -> None:
        """Raise ``ValueError`` naming ``path`` if the factors do not fit ``w``."""
        where = f"LoraWeight at {path!r}" if path else "LoraWeight"
        axes = sorted(self.a_axes + self.b_axes + self.stack_axes)
        if axes != list(range(self.w.ndim)):
            raise ValueError(
                f"{where}: a_axes={self.a_axes}, b_axes={self.b_axes} and stack_axes="
                f"{self.stack_axes} must split the {self.w.ndim} axes of w {self.w.shape} "
                "exactly once each."
            )
        want_a, want_b = self.expected_shapes()
        if self.a.shape != want_a or self.b.shape != want_b:
            raise ValueError(
                f"{where}: factors do not fit w {tuple(self.w.shape)}: got a "
                f"{tuple(self.a.shape)} and b {tuple(self.b.shape)}, expected a {want_a} "
                f"and b {want_b}."
            )

    def delta(self) -> jax.Array:
        """``scale * a @ b`` laid out like ``w`` (in the factors' dtype)."""
        a_sub, b_sub, w_sub = self.subscripts()
        return jnp.einsum(f"{a_sub},{b_sub}->{w_sub}", self.a, self.b) * self.scale

    def subscripts(self, letters: str = string.ascii_letters) -> tuple[str, str, str]:
        """Einsum subscripts of ``a``, ``b`` and ``w``; the rank is the last letter used."""
        ndim = len(self.a_axes) + len(self.b_axes) + len(self.stack_axes)
        w_sub, rank = letters[:ndim], letters[ndim]
        pick = lambda axes: "".join(w_sub[i] for i in axes)  # noqa: E731
        stack = pick(self.stack_axes)
        return stack + pick(self.a_axes) + rank, stack + rank + pick(self.b_axes), w_sub

    def num_adapter_params(self) -> int:
        return math.prod(self.a.shape) + math.prod(self.b.shape)

    def __repr__(self) -> str:
        return display.node_repr(self, kind="lora", frozen=("w",))

    def __treescope_repr__(self, path, subtree_renderer):
        return display.node_treescope(self, path, subtree_renderer, kind="lora", frozen=("w",))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a plain leaf as fully trainable (PEFT's ``modules_to_save``): a head, a bias, a norm.

    >>> import jax.numpy as jnp, lorax
    >>> lorax.Trainable(jnp.zeros(3)).value.shape
    (3,)
    """

    value: jax.Array

    def __repr__(self) -> str:
        return display.node_repr(self, kind="full")

    def __treescope_repr__(self, path, subtree_renderer):
        return display.node_treescope(self, path, subtree_renderer, kind="full")


def is_node(x) -> bool:
    """True for the nodes lorax inserts into a tree."""
    return isinstance(x, (LoraWeight, Trainable))
