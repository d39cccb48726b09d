"""The prefill programs: the decoder over the (pruned) prompt, optionally filling a KV cache.

Two strategies behind one result type, chosen by the method record's stage:
  * `prefill` runs every layer on the decoder inputs as given (no pruning, or pruning
    before layer 0);
  * `prefill_pruned_at_layer` runs an "llm"-stage method (FastV, DART): layers < K see
    every token, the method chooses the kept visual tokens from what layer K sees
    (`LayerInputs`), and layers >= K and their cache hold only the L - N + K remaining
    tokens at their original positions.
The cache has one length per layer; `Prefilled.kv_valid` / `prompt_lengths` say which
slots hold prompt tokens and where each layer's first new token goes, which is all the
decode loop needs to know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models.llama import KVCache, LlamaModel
from zspa_jax.methods.base import LayerInputs, Method, check_layer

__all__ = [
    "Prefilled",
    "check_layer",
    "pruned_gather_index",
    "prefill",
    "prefill_pruned_at_layer",
    "run_prefill",
]


class Prefilled(NamedTuple):
    # [B, L', D] final-normed hidden states of the (pruned) prompt ([B, 1, D]: `last_only`)
    hidden: jax.Array
    mask: jax.Array  # int32 [B, L']: 0 on padding
    kept: jax.Array | None  # int32 [B, K] kept visual tokens chosen inside the LLM, else None
    cache: KVCache | None  # per-layer k/v [B, S_i, Hkv, Dh] (None without a cache)
    kv_valid: tuple[jax.Array, ...] | None  # per layer bool [B, S_i]: slots holding a prompt token
    prompt_lengths: jax.Array | None  # int32 [layers]: each layer's first free slot


def pruned_gather_index(
    slots: jax.Array, kept_slots: jax.Array, length: int, anchors: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Where each position of the pruned sequence comes from.

    slots: int32 [B, N], each row's placeholder positions (models.protocol's visual layout);
    kept_slots: int32 [B, K], the position whose RoPE position (and, unless merged, whose
    embedding) each kept entry takes; anchors: int32 [B, K], where each kept entry sits in
    the sequence (None: at its slot; merged tokens sit at their image's first slot, entries
    with equal anchors in the order given). The pruned row is the L - N non-placeholder
    tokens in order with the K kept entries at their anchors.
    Returns (src int32 [B, L - N + K], a sequence position; entry int32 [B, L - N + K], the
    kept entry there or -1).
    """
    b, n = slots.shape
    keep = kept_slots.shape[1]
    anchors = kept_slots if anchors is None else anchors
    is_visual = jnp.zeros((b, length), jnp.bool_).at[jnp.arange(b)[:, None], slots].set(True)
    keys = jnp.concatenate([jnp.where(is_visual, 2 * length, jnp.arange(length)), anchors], axis=1)
    order = jnp.argsort(keys, axis=1, stable=True)[:, : length - n + keep]
    entry = jnp.where(order >= length, order - length, -1)
    src = jnp.where(
        entry >= 0, jnp.take_along_axis(kept_slots, jnp.maximum(entry, 0), axis=1), order
    )
    return src.astype(jnp.int32), entry.astype(jnp.int32)


def _causal(mask: jax.Array, slots: int | None) -> jax.Array:
    """bool [B, L, S]: query i sees slot j <= i holding a real token (S = L without a cache)."""
    length = mask.shape[1]
    slots = length if slots is None else slots
    valid = jnp.pad(mask.astype(bool), ((0, 0), (0, slots - length)))
    return (jnp.arange(slots)[None, None, :] <= jnp.arange(length)[None, :, None]) & valid[
        :, None, :
    ]


def _empty_kv(decoder: LlamaModel, b: int, slots: int, dtype) -> tuple[jax.Array, jax.Array]:
    cfg = decoder.config
    shape = (b, slots, cfg.num_key_value_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def _run_layers(
    decoder, layers, x, positions, mask, cache_length, query_row_at=None, last_only=False
):
    """Layers `layers` on x [B, L, D]; with `cache_length` each fills a fresh cache of that
    many slots (the prompt attends over its own keys by query blocks: models.layers.
    causal_prompt_attention). Returns (x, k list, v list, (last-query attention row, keys)
    of `query_row_at`). `last_only`: the decoder's last layer computes only the last
    position's output (its keys and values still cover every position), so x comes back [B, 1, D]."""
    causal = _causal(mask, cache_length)
    ks, vs, row = [], [], None
    final = len(decoder.layers) - 1
    for i in layers:
        kv = None if cache_length is None else _empty_kv(decoder, x.shape[0], cache_length, x.dtype)
        x, kv, *extra = decoder.layers[i](
            x,
            positions,
            causal,
            kv,
            None if kv is None else 0,
            i == query_row_at,
            last_only and i == final,
            kv is not None,
        )
        row = extra if extra else row
        if kv is not None:
            ks.append(kv[0])
            vs.append(kv[1])
    return x, ks, vs, row


def _valid_slots(mask: jax.Array, slots: int) -> jax.Array:
    return jnp.pad(mask.astype(bool), ((0, 0), (0, slots - mask.shape[1])))


def prefill(
    decoder: LlamaModel,
    embeds: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache_length: int | None = None,
    last_only: bool = False,
) -> Prefilled:
    """Every layer on embeds [B, L, D] (positions [B, L] or [3, B, L]; mask [B, L]); with
    `cache_length` S >= L, also a KV cache of S slots per layer. `last_only`: the hidden
    state of the last position only (what generation reads), [B, 1, D]: the last layer
    then skips the other positions' queries, attention output and MLP."""
    x = embeds.astype(decoder.embed_tokens.embedding.dtype)
    layers = range(len(decoder.layers))
    x, ks, vs, _ = _run_layers(
        decoder, layers, x, positions, mask, cache_length, last_only=last_only
    )
    if cache_length is None:
        return Prefilled(decoder.norm(x), mask, None, None, None, None)
    valid = _valid_slots(mask, cache_length)
    lengths = jnp.full((len(layers),), mask.shape[1], jnp.int32)
    return Prefilled(
        decoder.norm(x), mask, None, KVCache(tuple(ks), tuple(vs)), (valid,) * len(layers), lengths
    )


def prefill_pruned_at_layer(
    decoder: LlamaModel,
    embeds: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    *,
    method: Method,
    layer: int,
    keep: int,
    visual_index: jax.Array,
    visual_valid: jax.Array | None,
    text_mask: jax.Array,
    cache_length: int | None = None,
    last_only: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Prefilled:
    """An "llm"-stage method on the unpruned prompt (module docstring). visual_index: int32
    [B, N], each row's placeholder positions. With `cache_length` S, layers < K cache S
    slots and layers >= K cache S - N + K. `last_only`: as in `prefill`. `options`: the
    method's option values (`PruneConfig.options`; None: its defaults); `layer` is K."""
    num_layers = len(decoder.layers)
    num_visual = visual_index.shape[1]
    check_layer(num_layers, layer, method.name)
    if not 1 <= keep <= num_visual:
        raise ValueError(f"method {method.name!r}: keep={keep} must be in [1, N={num_visual}]")
    length = mask.shape[1]
    x = embeds.astype(decoder.embed_tokens.embedding.dtype)
    x, ks, vs, row = _run_layers(
        decoder, range(layer), x, positions, mask, cache_length, query_row_at=layer - 1
    )
    attention_row, keys = row
    visual_index = visual_index.astype(jnp.int32)
    inputs = LayerInputs(
        x,
        attention_row[:, :length],
        keys,
        decoder.norm.scale[...],
        visual_index,
        visual_valid,
        text_mask,
        num_visual,
    )
    values = method.resolve_options(options)
    kept = method.select(inputs, keep=keep, **method.select_options(values))
    src, _ = pruned_gather_index(
        visual_index, jnp.take_along_axis(visual_index, kept, axis=1), length
    )
    x = jnp.take_along_axis(x, src[..., None], axis=1)
    positions = jnp.take_along_axis(
        positions, jnp.broadcast_to(src, positions.shape[:-1] + src.shape[-1:]), axis=-1
    )
    late_mask = jnp.take_along_axis(mask, src, axis=1)
    late_slots = None if cache_length is None else cache_length - num_visual + keep
    x, late_ks, late_vs, _ = _run_layers(
        decoder, range(layer, num_layers), x, positions, late_mask, late_slots, last_only=last_only
    )
    if cache_length is None:
        return Prefilled(decoder.norm(x), late_mask, kept, None, None, None)
    late_length = length - num_visual + keep
    valid = (_valid_slots(mask, cache_length),) * layer + (_valid_slots(late_mask, late_slots),) * (
        num_layers - layer
    )
    lengths = jnp.asarray([length] * layer + [late_length] * (num_layers - layer), jnp.int32)
    cache = KVCache(tuple(ks + late_ks), tuple(vs + late_vs))
    return Prefilled(decoder.norm(x), late_mask, kept, cache, valid, lengths)


def run_prefill(
    decoder: LlamaModel, inputs, prune, cache_length: int | None = None, last_only: bool = False
) -> Prefilled:
    """The strategy the method's record asks for, on `zspa_jax.pipeline.DecoderInputs`."""
    if prune is None or inputs.visual_index is None or not prune.record.llm_layer:
        return prefill(
            decoder, inputs.embeds, inputs.positions, inputs.mask, cache_length, last_only
        )
    return prefill_pruned_at_layer(
        decoder,
        inputs.embeds,
        inputs.positions,
        inputs.mask,
        method=prune.record,
        layer=prune.options["layer"],
        options=prune.options,
        keep=prune.num_keep(inputs.visual_index.shape[1]),
        visual_index=inputs.visual_index,
        visual_valid=inputs.visual_valid,
        text_mask=inputs.prompt_mask,
        cache_length=cache_length,
        last_only=last_only,
    )
