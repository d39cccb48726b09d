"""FastV: drop the visual tokens the last prompt token attends to least, inside the LLM.

Paper: L. Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
Inference Acceleration for Large Vision-Language Models", ECCV 2024, arXiv:2403.06764
(section 4). Official code: github.com/pkunlp-icler/FastV,
`src/FastV/llava-hf/transformers/.../modeling_llama.py` (`fastv_forward`, in-place variant).

With the decoder layer index K (default 2): layers 0..K-1 run on the whole prompt; the
attention of layer K-1 (the K-th layer; what it computed for the last prompt token, i.e.
the last position of a left-padded row), averaged over heads, scores the N visual tokens;
the `keep` best (ties -> lower index) stay, the others are dropped from the hidden states
before layer K, so layers K..end and their KV cache only ever hold the L - N + keep
remaining tokens. Kept tokens keep their original RoPE positions (the official code sets
`position_ids = keep_indexs`), and decoding continues at the unpruned prompt's last
position + 1. Shapes stay static: the early layers' cache holds S slots, the later
layers' S - N + keep, with the same number of free slots for new tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from models.layers import padding_causal_mask
from models.llama import KVCache, LlamaConfig, LlamaModel
from zspa_jax.pipeline import pruned_gather_index

__all__ = ["FastVPrefill", "check_layer", "decode_layers", "prefill"]


def check_layer(cfg: LlamaConfig, layer: int) -> None:
    """FastV's K must leave layers before it (for the attention) and after it (to prune)."""
    n = cfg.num_hidden_layers
    if not 1 <= layer < n:
        raise ValueError(
            f"method 'fastv': layer K={layer} is outside the decoder: K must be in [1, {n - 1}] for this "
            f"{n}-layer decoder (the attention of layer K-1 chooses the tokens, layers K.. run without them)"
        )


class FastVPrefill(NamedTuple):
    hidden: jax.Array  # [B, L', D] final-normed hidden states of the pruned sequence
    kept: jax.Array  # int32 [B, keep] kept visual tokens (indices into the N), ascending
    positions: jax.Array  # int32 [B, L'] original RoPE positions of the remaining tokens
    mask: jax.Array  # int32 [B, L'] 0 on left padding
    cache: KVCache | None  # per-layer lengths: S for layers < K, S - N + keep after


def _causal(mask: jax.Array, slots: int) -> jax.Array:
    """bool [B, L, S]: query i sees slot j <= i holding a real token (slots >= L empty)."""
    length = mask.shape[1]
    valid = jnp.pad(mask.astype(bool), ((0, 0), (0, slots - length)))
    causal = jnp.arange(slots)[None, None, :] <= jnp.arange(length)[None, :, None]
    return causal & valid[:, None, :]


def prefill(
    model: LlamaModel,
    embeds: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    input_ids: jax.Array,
    image_token_index: int,
    num_visual: int,
    keep: int,
    layer: int,
    cache_length: int | None = None,
) -> FastVPrefill:
    """Run the decoder with FastV on the unpruned sequence.

    embeds [B, L, D]; positions int [B, L]; mask [B, L] (left padding); input_ids [B, L]
    with one contiguous span of `num_visual` placeholders per row. `cache_length` S (>= L):
    also fill a KV cache (layers < K: S slots; layers >= K: S - N + keep slots).
    """
    check_layer(model.config, layer)
    if not 1 <= keep <= num_visual:
        raise ValueError(f"method 'fastv': keep={keep} must be in [1, N={num_visual}] (visual tokens left at layer {layer})")
    b, length, _ = embeds.shape
    x = embeds.astype(model.embed_tokens.embedding.dtype)
    cfg = model.config

    def empty(slots):
        shape = (b, slots, cfg.num_key_value_heads, cfg.head_dim)
        return jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype)

    ks, vs = [], []
    early = _causal(mask, cache_length) if cache_length else padding_causal_mask(mask)
    for i in range(layer):
        kv = empty(cache_length) if cache_length else None
        x, kv, *row = model.layers[i](x, positions, early, kv, 0 if cache_length else None, i == layer - 1)
        if kv is not None:
            ks.append(kv[0])
            vs.append(kv[1])
    row = row[0][:, :length]  # [B, L]: layer K-1's last-query attention, head mean
    start = jnp.argmax(input_ids == image_token_index, axis=1)[:, None]
    scores = jnp.take_along_axis(row, start + jnp.arange(num_visual)[None, :], axis=1)
    kept = jnp.sort(lax.top_k(scores, keep)[1], axis=1).astype(jnp.int32)  # ties -> lower index
    src = pruned_gather_index(input_ids, image_token_index, kept, num_visual)
    x = jnp.take_along_axis(x, src[..., None], axis=1)
    positions = jnp.take_along_axis(positions, src, axis=1)
    mask = jnp.take_along_axis(mask, src, axis=1)
    late_length = None if not cache_length else cache_length - num_visual + keep
    late = _causal(mask, late_length) if cache_length else padding_causal_mask(mask)
    for i in range(layer, len(model.layers)):
        kv = empty(late_length) if cache_length else None
        x, kv = model.layers[i](x, positions, late, kv, 0 if cache_length else None)
        if kv is not None:
            ks.append(kv[0])
            vs.append(kv[1])
    cache = KVCache(k=tuple(ks), v=tuple(vs)) if cache_length else None
    return FastVPrefill(model.norm(x), kept, positions, mask, cache)


def decode_layers(
    model: LlamaModel,
    x: jax.Array,
    positions: jax.Array,
    early_valid: jax.Array,
    late_valid: jax.Array,
    cache: KVCache,
    early_slot: jax.Array,
    late_slot: jax.Array,
    layer: int,
) -> tuple[jax.Array, KVCache]:
    """One decode step through a FastV cache: x [B, 1, D], positions [B, 1]; early_valid
    bool [B, S] / late_valid bool [B, S'] (the new slot included); the new token's k/v go to
    `early_slot` in layers < K and `late_slot` after. Returns (normed hidden [B, 1, D], cache)."""
    x = x.astype(model.embed_tokens.embedding.dtype)
    ks, vs = [], []
    for i, lyr in enumerate(model.layers):
        is_early = i < layer
        valid = early_valid if is_early else late_valid
        x, kv = lyr(x, positions, valid[:, None, :], (cache.k[i], cache.v[i]), early_slot if is_early else late_slot)
        ks.append(kv[0])
        vs.append(kv[1])
    return model.norm(x), KVCache(k=tuple(ks), v=tuple(vs))
