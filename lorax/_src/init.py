"""`lorax.init`: find the weights to adapt and put an adapter node in place of each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lorax._src.bases.quantized import is_frozen_base
from lorax._src.config import ALL_LINEAR, AdapterSpec, LoraConfig
from lorax._src.kinds.adapter import KINDS, Adapter, fan_in_out
from lorax._src.kinds.initializers import makes_residual
from lorax._src.paths import unique_named_leaves
from lorax._src.sharding import place_factors
from lorax._src.tracing.table import supports
from lorax._src.tracing.trace import flatten_call, plain, trace
from lorax._src.tracing.transform import lora  # noqa: F401  (registers the rules and kinds)
from lorax._src.tracing.uses import Use, View, find_uses
from lorax._src.trainable import Trainable, is_lorax_node, is_node


def init(key: jax.Array, config: LoraConfig, fn: Callable, params: Any, *args, **kwargs) -> Any:
    """Return ``params`` with each targeted weight replaced by an adapter (`LoraWeight`, or
    `DoraWeight` with ``use_dora``) that leaves ``fn``'s outputs unchanged.

    ``fn(params, *args, **kwargs)`` is traced abstractly (no FLOPs are spent; this also
    works under ``jax.eval_shape``) to learn how every leaf is used: a weight's contracted
    axes go to ``a``, its output axes to ``b``, and layers stacked by ``scan`` get one
    adapter each.

    >>> import jax, jax.numpy as jnp, lorax
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    >>> params = {"w1": jnp.ones((8, 16)), "b1": jnp.zeros(16), "w2": jnp.ones((16, 2))}
    >>> lp = lorax.init(jax.random.key(0), lorax.LoraConfig(rank=2), fn, params, jnp.ones((1, 8)))
    >>> lp["w1"].a.shape, lp["w1"].b.shape, type(lp["b1"]).__name__
    ((8, 2), (2, 16), 'ArrayImpl')
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lorax.init: config must be a lorax.LoraConfig, got {type(config).__name__}.")
    unique_named_leaves(params, "lorax.init")
    if any(is_lorax_node(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_node)):
        raise ValueError("lorax.init: params already hold LoRA nodes; pass the plain tree "
                         "(lorax.merge(params) gives one).")
    flat, uses = uses_of(fn, params, args, kwargs)
    params_flat = flat.leaves[: flat.num_params]

    chosen: dict[int, tuple[AdapterSpec, Use]] = {}
    for i, name in enumerate(flat.names[: flat.num_params]):
        leaf_uses = uses.get(i, [])
        linear = bool(leaf_uses) and not any(u.lookup for u in leaf_uses)
        spec = config.resolve(name, params_flat[i], linear)
        if spec is None:
            continue
        if not leaf_uses:
            raise ValueError(
                f"lorax.init: target {name!r} (shape {tuple(jnp.shape(params_flat[i]))}) is not "
                "used as a matmul, einsum, convolution or lookup weight by fn, so it cannot "
                "take a low-rank adapter. Mark it `trainable=` instead, or change `targets`."
            )
        use = first_use(leaf_uses)
        reason = unfit(params_flat[i], use)
        if reason and config.targets == ALL_LINEAR:
            continue  # not a weight the user named: lorax.explain lists it as skipped
        if reason:
            raise ValueError(f"lorax.init: target {name!r} (shape {tuple(jnp.shape(params_flat[i]))}) cannot "
                             f"take a low-rank adapter: {reason}. Change `targets`, or mark it `trainable=`.")
        chosen[i] = spec, use
    if not chosen:
        candidates = [f"  {flat.names[i]} {tuple(jnp.shape(params_flat[i]))}" for i in sorted(uses)]
        raise ValueError(
            f"lorax.init: targets={config.targets!r} matched no weight. Weights fn uses as "
            "matmul/conv/lookup weights:\n" + "\n".join(candidates or ["  (none)"])
        )

    out = list(flat.leaves)
    for n, (i, (spec, use)) in enumerate(sorted(chosen.items())):
        out[i] = _adapt(jax.random.fold_in(key, n), spec, flat.names[i], params_flat[i], use)
    for kind in {type(out[i]) for i in chosen}:  # each kind builds what its nodes share
        mine = [i for i in sorted(chosen) if type(out[i]) is kind]
        linked = kind.link({flat.names[i]: out[i] for i in mine})
        for i in mine:
            out[i] = linked[flat.names[i]]
    for i, name in enumerate(flat.names[: flat.num_params]):
        if i not in chosen and config.is_trainable(name):
            if is_frozen_base(params_flat[i]):
                raise ValueError(f"lorax.init: {name!r} (shape {params_flat[i].shape}) is a quantized weight "
                                 f"({params_flat[i].fmt}) and matches `trainable=`; quantized weights are "
                                 "frozen. Target it for an adapter, or keep it in full precision to train it.")
            out[i] = Trainable(params_flat[i])
    return jax.tree_util.tree_unflatten(flat.treedef, out)[0]


def uses_of(fn: Callable, params: Any, args: tuple, kwargs: dict):
    """The flattened call and how ``fn`` uses each of its parameter leaves."""
    flat = flatten_call(params, args, kwargs)
    closed, _ = trace(fn, flat)
    views = [View(i, tuple(range(jnp.ndim(plain(flat.leaves[i]))))) if i < flat.num_params else None
             for i in flat.dynamic]
    return flat, find_uses(closed.jaxpr, views)


def first_use(uses: list[Use]) -> Use:
    """The use an adapter is built from: a lookup if any (an embedding tied to a head), else the first."""
    return ([u for u in uses if u.lookup] or uses)[0]


def unfit(leaf: Any, use: Use) -> str | None:
    """Why a used weight cannot take an adapter, or None."""
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        return f"its dtype {dtype} is not floating"
    if not use.a_axes:
        return "its use contracts no axis (an elementwise scale)"
    if not use.b_axes:
        return "its use leaves no output axis"
    return None


def _adapt(key: jax.Array, spec: AdapterSpec, name: str, w: Any, use: Use) -> Adapter:
    fan_in, fan_out = fan_in_out(w.shape, use.a_axes, use.b_axes)
    kind = KINDS[spec.kind]
    if kind.bounded_rank and spec.rank > min(fan_in, fan_out):
        raise ValueError(
            f"lorax.init: rank {spec.rank} for {name!r} (shape {tuple(w.shape)}) exceeds min(in, out) = "
            f"min({fan_in}, {fan_out}); choose rank <= {min(fan_in, fan_out)}."
        )
    base = w  # narrowed below; w goes on to `create` as given
    if is_frozen_base(base) and makes_residual(spec.init):
        raise ValueError(f"lorax.init: {name!r} (shape {tuple(w.shape)}) is quantized ({base.fmt}); "
                         f"init={spec.init!r} would replace it by a full-precision residual. Use "
                         "kaiming_uniform or gaussian.")
    if not supports(use.primitive, kind):
        raise ValueError(
            f"lorax.init: {kind.__name__} has no factored rule for {name!r} (shape {tuple(w.shape)}), "
            f"used through {use.primitive!r}; exclude it (`exclude=`) or use plain LoRA for it."
        )
    return place_factors(kind.create(key, spec, w, use))
