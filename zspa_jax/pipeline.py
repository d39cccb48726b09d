"""Composes the model pieces into the (optionally pruned) sequence the decoder sees.

image -> tower -> projector -> select_tokens -> the K kept tokens replace the N
placeholders -> embeddings, mask and RoPE positions of length L - N + K. Everything is
static-shaped and jittable; host-side validation lives in `zspa_jax.inputs`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.layers import positions_from_mask
from models.llava import LlavaForConditionalGeneration, merge_image_features
from zspa_jax.methods.tower import place_span_tokens, tower_prune
from zspa_jax.pruning import CLS_ATTENTION_METHODS, PruneConfig, _default_batching, select_tokens


class DecoderInputs(NamedTuple):
    embeds: jax.Array  # [B, L', D]
    mask: jax.Array  # int32 [B, L'], 0 on left padding
    positions: jax.Array  # int32 [B, L']
    kept_indices: jax.Array | None  # int32 [B, K] into the N visual tokens, ascending
    # (visionzip: the placeholder slot each of the K tokens takes, in sequence order)


def prompt_token_mask(
    input_ids: jax.Array, attention_mask: jax.Array, image_token_index: int, special_ids: tuple[int, ...], scope: str
) -> jax.Array:
    """bool [B, L]: which tokens form "the prompt" for relevance scoring.

    "all_text": every real non-image token; "question": those after the image span.
    Special tokens (BOS, EOS, pad, ...) never count.
    """
    is_image = input_ids == image_token_index
    mask = attention_mask.astype(bool) & ~is_image
    for special in special_ids:
        mask &= input_ids != special
    if scope == "question":
        positions = jnp.arange(input_ids.shape[1])
        last_image = jnp.max(jnp.where(is_image, positions, -1), axis=1, keepdims=True)
        mask &= positions > last_image
    elif scope != "all_text":
        raise ValueError(f"prompt_scope must be 'question' or 'all_text', got {scope!r}")
    return mask


def pruned_gather_index(input_ids: jax.Array, image_token_index: int, kept: jax.Array, num_visual: int) -> jax.Array:
    """int32 [B, L - N + K]: for each position of the pruned sequence, its source position.

    Each row holds one contiguous span of N placeholders starting at s_b; the pruned row
    is tokens [0, s_b), then the kept visual tokens s_b + kept, then [s_b + N, L).
    `kept` may be unsorted (merged tokens' slots, in sequence order).
    """
    b, length = input_ids.shape
    keep = kept.shape[1]
    start = jnp.argmax(input_ids == image_token_index, axis=1)[:, None]  # [B, 1]
    j = jnp.arange(length - num_visual + keep)[None, :]
    in_span = (j >= start) & (j < start + keep)
    visual_src = start + jnp.take_along_axis(kept, jnp.clip(j - start, 0, keep - 1), axis=1)
    text_src = jnp.where(j < start, j, j + num_visual - keep)
    return jnp.where(in_span, visual_src, text_src).astype(jnp.int32)


def decoder_inputs(
    model: LlavaForConditionalGeneration,
    input_ids: jax.Array,
    pixel_values: jax.Array | None,
    attention_mask: jax.Array,
    prune: PruneConfig | None = None,
    special_ids: tuple[int, ...] = (),
    rng: jax.Array | None = None,
    keep_positions: bool = False,
) -> DecoderInputs:
    """Build the decoder's inputs, pruning visual tokens when `prune` is given.

    input_ids: int [B, L]; pixel_values: [M, C, H, W] (M == B when pruning: one image
    per row); attention_mask: [B, L]. Pruning scores the projected visual tokens against
    the mean of the raw input-embedding rows of the prompt tokens (README.md, "ZSPAPrune,
    exactly", step 1).
    Positions are renumbered contiguously (what transformers computes for the pruned
    `inputs_embeds`) unless `keep_positions`, which keeps each token's original position.
    """
    cfg = model.config
    text_embeds = model.embed_tokens(input_ids)
    positions = positions_from_mask(attention_mask)
    if pixel_values is None:
        return DecoderInputs(text_embeds, attention_mask, positions, None)
    if prune is not None and prune.method in CLS_ATTENTION_METHODS:
        # VisPruner / VisionZip read the tower's [CLS] attention (zspa_jax.methods.tower).
        n = cfg.image_seq_length
        pruned = tower_prune(model, pixel_values, prune.method, prune.num_keep(n), _default_batching())
        merged = text_embeds
        if pruned.visual is not None:
            merged = merge_image_features(input_ids, text_embeds, pruned.visual, cfg.image_token_index)
        kept, tokens = pruned.kept, pruned.tokens
    else:
        visual = model.image_features(pixel_values)  # [M, N, D]
        merged = merge_image_features(input_ids, text_embeds, visual, cfg.image_token_index)
        if prune is None or prune.method == "fastv":  # FastV prunes inside the decoder
            return DecoderInputs(merged, attention_mask, positions, None)
        n = visual.shape[1]
        prompt_mask = prompt_token_mask(
            input_ids, attention_mask, cfg.image_token_index, special_ids, prune.prompt_scope
        )
        kept = select_tokens(
            visual,
            text_embeds,
            prompt_mask,
            keep=prune.num_keep(n),
            method=prune.method,
            core_ratio=prune.core_ratio,
            rng=rng,
        )
        tokens = None
    src = pruned_gather_index(input_ids, cfg.image_token_index, kept, n)
    embeds = jnp.take_along_axis(merged, src[..., None], axis=1)
    if tokens is not None:  # merged tokens (VisionZip) are new tokens: write them over the span
        embeds = place_span_tokens(embeds, input_ids, cfg.image_token_index, tokens)
    mask = jnp.take_along_axis(attention_mask, src, axis=1)
    if keep_positions:
        # Original RoPE positions: gaps where pruned tokens were (merged tokens: their slot's).
        positions = jnp.take_along_axis(positions, src, axis=1)
    else:
        positions = positions_from_mask(mask)
    return DecoderInputs(embeds, mask, positions, kept)
