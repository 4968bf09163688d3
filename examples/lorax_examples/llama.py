"""A LLaMA-family decoder in Flax linen, laid out like transformers' LlamaForCausalLM.

Parameter paths mirror the torch module names (``params/layers/self_attn/q_proj/kernel``
stacked over layers by ``nn.scan``), so `lorax.peft.LLAMA` maps them to PEFT's keys.
Kernels are Flax's ``[in, out]``: ``kernel = torch_weight.T``.

The same module decodes with a KV cache: ``Llama(config).apply(params, ids, positions, cache)``
returns ``(logits, cache)`` (see `init_cache` and `cached_step`); without a cache it is the
plain training forward.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax
from lorax_examples import xent
from lorax_examples.products import bf16_bits, bf16_of_bits, matmul
from lorax_examples.xent import fused_xent


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 49152
    dim: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    hidden: int = 1536
    rope_theta: float = 100000.0
    eps: float = 1e-5
    max_len: int = 2048
    tie_embeddings: bool = True
    # recompute each layer in the backward: True (all of it: less memory, about 1/3 more compute),
    # False, or a `jax.checkpoint_policies` name of what to keep ("dots_with_no_batch_dims_saveable":
    # the projections' outputs, recomputing norms, RoPE, attention and SiLU)
    remat: bool | str = True
    # None: fp32 throughout. jnp.bfloat16: the weights are held in bf16 and the projections and
    # head take bf16 operands, accumulating in fp32 (AVX512-BF16/AMX on CPU); activations, norms,
    # attention and the loss stay fp32, but for the MLP's gate and up, rounded to bf16 and kept
    # for the backward as bits (`bf16_gating`).
    matmul_dtype: Any = None
    # LoRA written into the model by hand, for comparison with lorax (benchmarks/memory.py): the
    # projections named here (e.g. ("q_proj", "v_proj")) get lora_a [in, r] and lora_b [r, out]
    # params and compute x·W + (alpha/r)·(x·a)·b, factored. () leaves the model plain.
    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # the training loss (`Llama.__call__` with ``targets``) over this many slices of the
    # vocabulary (`chunked_xent`: each slice's logits recomputed in the backward); 0: over the
    # whole vocabulary with its gradient (`lorax_examples.xent.fused_xent`: a frozen table read in chunks)
    head_chunks: int = 0
    # the layer loop of a forward without a cache as this many groups of consecutive layers,
    # each group recomputed in the backward from its input (`grouped_layers`). With remat=True
    # the backward keeps groups + layers/groups residual streams instead of one per layer (6
    # groups of 30 layers: 11), for one more forward of each layer; with remat=False or a policy,
    # what each layer keeps, for one group at a time. For adapters: a trained stack's gradient is
    # summed whole in each group, so full fine-tuning holds more with groups. 0: one loop
    remat_groups: int = 0
    # a forward without a cache runs causal attention as this many blocks of consecutive queries,
    # each over the keys up to its own end (`causal_attend`): (blocks + 1) / (2 · blocks) of the
    # products and softmax over every key (4: 0.625). 1: one block over every key, masked
    attention_blocks: int = 4

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def remat_setting(name: str) -> bool | str:
    """`LlamaConfig.remat` for a command line's ``--remat``: ``none``, ``full`` (each layer
    recomputed in the backward) or a `jax.checkpoint_policies` name (what each layer keeps).

    >>> remat_setting("none"), remat_setting("dots_with_no_batch_dims_saveable")
    (False, 'dots_with_no_batch_dims_saveable')
    """
    setting = {"none": False, "full": True}.get(name, name)
    if isinstance(setting, str) and not hasattr(jax.checkpoint_policies, setting):
        raise ValueError(f"remat must be none, full or a jax.checkpoint_policies name, got {name!r}")
    return setting


def checkpoint_policy(remat: bool | str):
    """The ``jax.checkpoint`` policy of a truthy `LlamaConfig.remat`: None (save nothing) for
    True, else the `jax.checkpoint_policies` member it names."""
    return getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32).astype(x.dtype)


def lora_of(config: LlamaConfig, name: str) -> dict:
    """`Linear`'s hand-written LoRA arguments for the projection ``name``."""
    if name not in config.lora_targets:
        return {}
    return dict(lora_rank=config.lora_rank, lora_scale=config.lora_alpha / config.lora_rank)


class Linear(nn.Module):
    """``x @ kernel`` (no bias; ``kernel`` [in, out] as Flax's Dense) through `matmul`; with
    ``lora_rank``, plus the hand-written factored LoRA term ``scale·(x·lora_a)·lora_b``."""

    features: int
    dtype: Any = None
    lora_rank: int = 0
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = matmul(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), self.dtype)
        if not self.lora_rank:
            return y
        a = self.param("lora_a", nn.initializers.normal(1.0 / self.lora_rank), (x.shape[-1], self.lora_rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features))
        return y + (self.lora_scale * (x @ a) @ b).astype(y.dtype)


@jax.named_scope("rope")
def rope(x, positions, theta):
    """transformers' rotate-half rotary embedding on ``x`` [batch, seq, heads, head_dim]:
    ``x·cos + rotate_half(x)·sin``, each half computed where it is written: one concatenation
    of the results, not of a rotated copy of ``x`` and of the angles (the same values; XLA:CPU
    fuses it better, see docs/performance.md)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def write_cache(cache, new, start):
    """``cache`` [batch, slots, ...] with ``new`` [batch, t, ...] written at slot ``start[b]`` of each row."""
    put = lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0)  # noqa: E731
    return jax.vmap(put)(cache, new, start)


def attend(q, k, v, mask, groups: int):
    """Scaled dot-product attention of q [batch, seq, heads, head_dim] over k, v [batch, slots,
    kv_heads, head_dim], each kv head serving ``groups`` query heads; ``mask`` [batch or 1, 1,
    seq, slots] says which slots each query sees.

    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    >>> k, v = jax.random.normal(jax.random.key(1), (2, 1, 4, 1, 8))
    >>> out = attend(q, k, v, jnp.tril(jnp.ones((4, 4), bool))[None, None], groups=2)
    >>> out.shape, bool(jnp.allclose(out[:, 0], v[:, 0]))  # the first query sees its own slot alone
    ((1, 4, 2, 8), True)
    """
    b, t, heads, hd = q.shape
    # the queries of one kv head stacked as one [groups * seq, head_dim] matrix, so each product
    # is one matrix per batch row and kv head, `groups` times taller than a matrix per query head
    q = q.reshape(b, t, heads // groups, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, -1, groups * t, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(hd)
    logits = jnp.where(jnp.tile(mask, (1, 1, groups, 1)), logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(b, -1, groups, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, heads, hd)


def causal_attend(q, k, v, groups: int, blocks: int):
    """`attend` of q [batch, seq, heads, head_dim] over k, v [batch, seq, kv_heads, head_dim]
    under the causal mask, as ``blocks`` blocks of consecutive queries (``min(blocks, seq)``, as
    even as ``seq`` allows): each block attends to the keys up to its own end, so the products
    and the softmax skip the keys no query of the block sees. The same values as one masked
    `attend`; on XLA:CPU at the example step's shapes, 4 blocks take about 3/4 of its time.

    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (2, 7, 4, 8))
    >>> k, v = jax.random.normal(jax.random.key(1), (2, 2, 7, 2, 8))
    >>> whole = attend(q, k, v, jnp.tril(jnp.ones((7, 7), bool))[None, None], groups=2)
    >>> bool(jnp.allclose(causal_attend(q, k, v, groups=2, blocks=3), whole, atol=1e-6))
    True
    """
    t = q.shape[1]
    blocks = min(blocks, t)
    ends = [round(i * t / blocks) for i in range(blocks + 1)]
    outs = []
    for start, end in zip(ends[:-1], ends[1:]):
        mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
        outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask, groups))
    return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None):
        """``cache``: ``(k, v)`` [batch, slots, kv_heads, head_dim] of this layer; the new keys and
        values are written at their positions (slot = position) and attention reads all slots
        under ``mask``. Without a cache, ``mask`` is None: causal attention (`causal_attend`)."""
        c = self.config
        b, t, _ = x.shape
        proj = lambda n, name: Linear(n * c.head_dim, c.matmul_dtype, name=name, **lora_of(c, name))  # noqa: E731
        q = proj(c.heads, "q_proj")(x).reshape(b, t, c.heads, c.head_dim)
        k = proj(c.kv_heads, "k_proj")(x).reshape(b, t, c.kv_heads, c.head_dim)
        v = proj(c.kv_heads, "v_proj")(x).reshape(b, t, c.kv_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if cache is not None:
            cache = tuple(write_cache(old, new, positions[:, 0]) for old, new in zip(cache, (k, v)))
            k, v = cache
        # recomputed in the backward from q, k and v: the layer loop then keeps no [batch, heads,
        # seq, seq] scores or probabilities, nor the transposed queries, keys and values
        if mask is None:
            out = jax.checkpoint(causal_attend, static_argnums=(3, 4))(q, k, v, c.heads // c.kv_heads,
                                                                      attention_blocks_setting(c.attention_blocks))
        else:
            out = jax.checkpoint(attend, static_argnums=(4,))(q, k, v, mask, c.heads // c.kv_heads)
        out = Linear(c.dim, c.matmul_dtype, name="o_proj", **lora_of(c, "o_proj"))(out.reshape(b, t, -1))
        return out if cache is None else (out, cache)


def gating(gate, up):
    """The MLP's ``silu(gate)·up``."""
    return nn.silu(gate) * up


def _from_bits(bits):
    return bf16_of_bits(bits).astype(jnp.float32)


@jax.custom_vjp
def bf16_gating(gate, up):
    """`gating` of ``gate`` and ``up`` rounded to bf16, computed in fp32; its backward keeps the
    two as their bf16 bits and recomputes the gating from them. A layer loop then saves them at
    half the bytes of fp32, and as bits: XLA:CPU would write a bf16 stack through an fp32 copy of
    the whole stack, bits as they are.

    >>> import jax, jax.numpy as jnp
    >>> gate, up = jnp.array([0.5, -1.0]), jnp.array([1.0 + 2**-12, 2.0])
    >>> bool(jnp.all(bf16_gating(gate, up) == gating(gate, jnp.array([1.0, 2.0]))))  # up rounded to bf16
    True
    >>> jax.grad(lambda g: bf16_gating(g, up).sum())(gate).dtype
    dtype('float32')
    """
    return gating(_from_bits(bf16_bits(gate)), _from_bits(bf16_bits(up)))


def _bf16_gating_forward(gate, up):
    kept = (bf16_bits(gate), bf16_bits(up))
    return gating(*map(_from_bits, kept)), kept


def _bf16_gating_backward(kept, cotangent):
    return jax.vjp(gating, *map(_from_bits, kept))[1](cotangent)


bf16_gating.defvjp(_bf16_gating_forward, _bf16_gating_backward)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda n, name: Linear(n, c.matmul_dtype, name=name, **lora_of(c, name))  # noqa: E731
        # the gating recomputed in the backward from its two inputs: the layer loop then saves
        # gate and up alone, not also sigmoid(gate), silu(gate) and their product (3 of its 5
        # [batch, seq, hidden] stacks). With bf16 products the two are kept as bf16 bits
        # (`bf16_gating`): the down projection reads the gating in bf16 anyway
        gate_up = bf16_gating if c.matmul_dtype == jnp.bfloat16 else jax.checkpoint(gating)
        h = gate_up(dense(c.hidden, "gate_proj")(x), dense(c.hidden, "up_proj")(x))
        return dense(self.config.dim, "down_proj")(h)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None):
        c = self.config
        attended = Attention(c, name="self_attn")(RMSNorm(c.eps, name="input_layernorm")(x), positions, mask, cache)
        if cache is not None:
            attended, cache = attended
        x = x + attended
        x = x + MLP(c, name="mlp")(RMSNorm(c.eps, name="post_attention_layernorm")(x))
        return x, cache


def remat_groups_setting(groups: int, layers: int) -> int:
    """`LlamaConfig.remat_groups` for a command line's ``--remat-groups``: 0 (one layer loop) or
    a divisor of ``layers`` from 2 to ``layers // 2`` (groups of one layer would keep as many
    residual streams as the one loop, and recompute every layer twice); anything else is refused.

    >>> remat_groups_setting(6, 30), remat_groups_setting(0, 30)
    (6, 0)
    """
    whole = isinstance(groups, numbers.Integral) and not isinstance(groups, bool)
    if not whole or (groups and (groups < 2 or 2 * groups > layers or layers % groups)):
        raise ValueError(f"remat-groups takes 0 or a divisor of the layer count ({layers}) from 2 to {layers // 2}, "
                         f"got {groups!r}")
    return int(groups)


def grouped_layers(config: LlamaConfig, stacked: dict, x, positions, mask):
    """The decoder layers over ``x``, run as ``config.remat_groups`` groups of consecutive
    layers, each under a ``jax.checkpoint`` (and each layer under ``config.remat``): the
    backward keeps the residual stream at each group's input, then recomputes that group's
    layers, keeping it at theirs. ``stacked`` is the layer loop's params, each [layers, ...]:
    every layer reads its own slice of them, so no more than one layer's weights are ever
    sliced out (a group's slice of a stack would be a copy of that many layers), and the
    gradients of the trained leaves (the adapters: small) are summed whole over each group. The
    same values and gradients as the one loop; decoding with a cache runs the one loop.

    >>> import jax, jax.numpy as jnp
    >>> config = LlamaConfig(vocab=32, dim=16, layers=4, heads=2, kv_heads=1, hidden=32, remat_groups=2)
    >>> ids = jnp.zeros((1, 5), int)
    >>> params = Llama(config).init(jax.random.key(0), ids)
    >>> one_loop = Llama(dataclasses.replace(config, remat_groups=0)).apply(params, ids)
    >>> bool(jnp.allclose(Llama(config).apply(params, ids), one_loop, atol=1e-6))
    True
    """
    c = config
    size = c.layers // remat_groups_setting(c.remat_groups, c.layers)

    def layer(x, i):
        weights = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), stacked)
        return DecoderLayer(c).apply({"params": weights}, x, positions, mask)[0], None

    if c.remat:
        layer = jax.checkpoint(layer, policy=checkpoint_policy(c.remat), prevent_cse=False)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def group(x, first):
        return jax.lax.scan(layer, x, first + jnp.arange(size))[0], None

    return jax.lax.scan(group, x, jnp.arange(c.remat_groups) * size)[0]


def attention_blocks_setting(blocks: int) -> int:
    """`LlamaConfig.attention_blocks`, checked: a whole number from 1; anything else is refused.

    >>> attention_blocks_setting(4)
    4
    """
    if isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral) or blocks < 1:
        raise ValueError(f"attention-blocks takes a whole number from 1, got {blocks!r}")
    return int(blocks)


def head_chunks_setting(chunks: int, vocab: int) -> int:
    """`LlamaConfig.head_chunks` for a command line's ``--head-chunks``: 0 (the whole vocabulary) or
    a divisor of ``vocab``; anything else is refused.

    >>> head_chunks_setting(8, 49152), head_chunks_setting(0, 49152)
    (8, 0)
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0 or (chunks and vocab % chunks):
        raise ValueError(f"head-chunks takes 0 or a divisor of the vocabulary ({vocab}), got {chunks!r}")
    return chunks


def with_memory_options(config: LlamaConfig, remat: str = "none", head_chunks: int = 0,
                        remat_groups: int = 0) -> LlamaConfig:
    """``config`` with a command line's memory options (``--remat``, ``--head-chunks``,
    ``--remat-groups``), each checked by its setting (`remat_setting`, `head_chunks_setting`,
    `remat_groups_setting`, in that order): a bad one raises the first refusal.

    >>> with_memory_options(LlamaConfig(), "full", 8, 6).remat_groups
    6
    """
    return dataclasses.replace(config, remat=remat_setting(remat),
                               head_chunks=head_chunks_setting(head_chunks, config.vocab),
                               remat_groups=remat_groups_setting(remat_groups, config.layers))


def chunked_xent(x, table, targets, chunks: int, dtype=None):
    """Mean cross-entropy of the tied head's logits ``x·tableᵀ`` against ``targets``, computed
    over ``chunks`` slices of the vocabulary with a running log-sum-exp. The logits are never
    held whole: each slice's are recomputed in the backward (``jax.checkpoint``) rather than
    saved, and the table is sliced where it is used, so a quantized one is dequantized one
    slice at a time inside `lorax.lora`.

    >>> import jax, jax.numpy as jnp, optax
    >>> x, table = jax.random.normal(jax.random.key(0), (2, 3, 8)), jax.random.normal(jax.random.key(1), (16, 8))
    >>> targets = jnp.array([[1, 5, 15], [0, 8, 9]])
    >>> full = optax.softmax_cross_entropy_with_integer_labels(x @ table.T, targets).mean()
    >>> bool(jnp.allclose(chunked_xent(x, table, targets, 4), full, atol=1e-5))
    True
    """
    vocab = table.shape[0]
    if not head_chunks_setting(chunks, vocab):
        raise ValueError(f"head-chunks takes 0 or a divisor of the vocabulary ({vocab}), got 0 for a sliced head")
    size = vocab // chunks
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)

    @jax.checkpoint
    def step(carry, start):
        top, total, picked = carry
        logits = matmul(x, jax.lax.dynamic_slice_in_dim(table, start, size, 0), (((1,), (1,)), ((), ())), dtype)
        new_top = jax.lax.stop_gradient(jnp.maximum(top, logits.max(-1)))  # the sum is exact for any shift
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[:, None]).sum(-1)
        local = targets - start
        hit = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[:, None], axis=1)[:, 0]
        return (new_top, total, picked + jnp.where((local >= 0) & (local < size), hit, 0.0)), None

    n = x.shape[0]
    start = (jnp.full((n,), jnp.finfo(jnp.float32).min), jnp.zeros((n,)), jnp.zeros((n,)))
    (top, total, picked), _ = jax.lax.scan(step, start, jnp.arange(chunks) * size)
    return jnp.mean(top + jnp.log(total) - picked)


class Llama(nn.Module):
    """``Llama(config).apply(params, ids)`` -> logits [batch, seq, vocab];
    ``apply(params, ids, targets=next_ids)`` -> the mean cross-entropy: with a tied head, from
    `lorax_examples.xent.fused_xent` (the gradient made with the loss, in token blocks), or
    over vocabulary slices with ``config.head_chunks`` (`chunked_xent`).

    With a cache (`init_cache`), ``apply(params, ids, positions, cache)`` -> ``(logits, cache)``:
    ``ids`` [batch, t] sit at ``positions`` [batch, t] (consecutive in each row) and attend to
    the cached slots up to their own position.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, ids, positions=None, cache=None, targets=None):
        c = self.config
        if targets is not None and cache is not None:
            raise ValueError("Llama: targets (the training loss) take no cache")
        embed = nn.Embed(c.vocab, c.dim, name="embed_tokens")
        t = ids.shape[1]
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(t), ids.shape)
            mask = None  # causal (`causal_attend`)
        else:
            slots = jnp.arange(cache[0].shape[2])
            mask = (slots <= positions[:, :, None])[:, None]  # [batch, 1, t, slots]
        layer = DecoderLayer
        if c.remat:
            layer = nn.remat(DecoderLayer, policy=checkpoint_policy(c.remat))
        layers = nn.scan(layer, variable_axes={"params": 0},
                         split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, 0), length=c.layers)
        grouped = remat_groups_setting(c.remat_groups, c.layers) and cache is None and not self.is_initializing()
        x = embed(ids).astype(jnp.float32)
        if grouped:
            x = grouped_layers(c, self.variables["params"]["layers"], x, positions, mask)
        else:
            x, cache = layers(c, name="layers")(x, positions, mask, cache)
        x = RMSNorm(c.eps, name="norm")(x)
        if targets is not None and c.head_chunks:
            if not c.tie_embeddings:
                raise ValueError("Llama: head_chunks slices the tied embedding; this model has an lm_head")
            return chunked_xent(x, embed.embedding, targets, c.head_chunks, c.matmul_dtype)
        if targets is not None and c.tie_embeddings:
            return fused_xent(x, embed.embedding, targets, c.matmul_dtype)
        if c.tie_embeddings:
            logits = matmul(x, embed.embedding, (((2,), (1,)), ((), ())), c.matmul_dtype)
        else:
            logits = Linear(c.vocab, c.matmul_dtype, name="lm_head")(x)
        if targets is not None:
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return logits if cache is None else (logits, cache)


def bf16_as_bits(frozen: Any, head_chunks: int = 0) -> Any:
    """``frozen`` with the bf16 weights a train step slices in a loop held as their bits
    (`lorax.quantize` ``"bf16"``): everything the layer loop scans (``layers/...``), and the
    tied embedding where the loss reads it in slices: over ``head_chunks`` vocabulary slices
    (`LlamaConfig.head_chunks`), or in chunks of `lorax_examples.xent.VOCAB_CHUNK` rows when it
    has more (`lorax_examples.xent.fused_xent`). XLA:CPU slices bf16 in a loop from an fp32 copy
    of the whole array; bits slice as they are. A table the step uses whole stays bf16, since
    XLA:CPU would write out a copy of the bits where a product reinterprets them. A tree with
    none of these comes back as it is.

    >>> import jax.numpy as jnp
    >>> tree = {"layers": {"w": jnp.ones((2, 2, 2), jnp.bfloat16)}, "embedding": jnp.ones((2, 2), jnp.bfloat16)}
    >>> held = bf16_as_bits(tree)
    >>> type(held["layers"]["w"]).__name__, held["embedding"].dtype
    ('Bf16Bits', dtype(bfloat16))
    >>> type(bf16_as_bits(tree, head_chunks=8)["embedding"]).__name__
    'Bf16Bits'
    """
    def sliced(path: str, x) -> bool:
        names = path.split("/")
        table = names[-1] == "embedding" and (head_chunks > 0 or xent.sliced_in_chunks(x.shape[0]))
        return x.dtype == jnp.bfloat16 and x.ndim >= 2 and ("layers" in names[:-1] or table)

    adapter = lambda x: isinstance(x, lorax.Adapter)  # noqa: E731  lorax names an adapter's w by the adapter's path
    leaves = [(jax.tree_util.keystr(path, simple=True, separator="/"), getattr(x, "w", x) if adapter(x) else x)
              for path, x in jax.tree_util.tree_leaves_with_path(frozen, is_leaf=adapter)]
    if not any(sliced(path, x) for path, x in leaves if hasattr(x, "dtype")):
        return frozen
    return lorax.quantize(frozen, "bf16", targets=sliced)


def quantize_like_gguf(params: dict) -> dict:
    """``params`` quantized as SmolLM2's GGUF file holds them: Q4_1 layer kernels (blocks along
    the input axis) and a Q8_0 embedding (blocks along its rows), for shapes-only measurements.

    >>> import jax, jax.numpy as jnp
    >>> config = LlamaConfig(vocab=64, dim=64, layers=1, heads=2, kv_heads=1, hidden=64)
    >>> q = quantize_like_gguf(Llama(config).init(jax.random.key(0), jnp.zeros((1, 2), int)))["params"]
    >>> table, up = q["embed_tokens"]["embedding"], q["layers"]["mlp"]["up_proj"]["kernel"]
    >>> table.fmt, table.axis, up.fmt
    ('q8_0', -1, 'q4_1')
    """
    return lorax.quantize(lorax.quantize(params, "q4_1", r".*/layers/.*/kernel"), "q8_0", r".*/embedding", axis=-1)


def init_cache(config: LlamaConfig, batch: int, slots: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """An empty KV cache ``(k, v)``, each [layers, batch, slots, kv_heads, head_dim]."""
    shape = (config.layers, batch, slots, config.kv_heads, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def cached_step(config: LlamaConfig):
    """``step(params, ids, positions, cache) -> (logits, cache)``: the model call `generate.generate` takes.

    Wrap it with `lorax.lora` for adapted params; build it once and reuse it, so that
    generation compiles once per shape.
    """
    model = Llama(config)
    return lambda params, ids, positions, cache: model.apply(params, ids, positions, cache)


_LAYER_WEIGHTS = {
    "self_attn/q_proj/kernel": "self_attn.q_proj.weight", "self_attn/k_proj/kernel": "self_attn.k_proj.weight",
    "self_attn/v_proj/kernel": "self_attn.v_proj.weight", "self_attn/o_proj/kernel": "self_attn.o_proj.weight",
    "mlp/gate_proj/kernel": "mlp.gate_proj.weight", "mlp/up_proj/kernel": "mlp.up_proj.weight",
    "mlp/down_proj/kernel": "mlp.down_proj.weight",
    "input_layernorm/scale": "input_layernorm.weight",
    "post_attention_layernorm/scale": "post_attention_layernorm.weight",
}


def params_from_torch_names(config: LlamaConfig, get) -> dict:
    """Build our params from ``get(torch_name) -> np.ndarray`` (a state dict or a GGUF reader):
    weights in ``config.matmul_dtype`` (default fp32), norm scales in fp32, quantized weights as
    they are."""
    dtype = config.matmul_dtype or jnp.float32
    layers: dict = {}
    for ours, theirs in _LAYER_WEIGHTS.items():
        stacked = _stack([get(f"model.layers.{i}.{theirs}") for i in range(config.layers)])
        if ours.endswith("kernel"):
            stacked = stacked.transpose((0, 2, 1))
        node = layers
        parts = ours.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _plain(stacked, jnp.float32 if ours.endswith("scale") else dtype)
    params = {"embed_tokens": {"embedding": _plain(get("model.embed_tokens.weight"), dtype)},
              "layers": layers, "norm": {"scale": jnp.asarray(get("model.norm.weight"), jnp.float32)}}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": _plain(get("lm_head.weight").transpose((1, 0)), dtype)}
    return {"params": params}


def _stack(weights: list):
    """Stack layers' weights: arrays, or quantized weights (`lorax.QuantizedArray`) code by code."""
    if isinstance(weights[0], lorax.QuantizedArray):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *weights)
    return np.stack(weights)


def _plain(w, dtype):
    """A plain weight as a ``dtype`` array; a quantized one as it is (it dequantizes to fp32)."""
    return w if isinstance(w, lorax.QuantizedArray) else jnp.asarray(w, dtype)
