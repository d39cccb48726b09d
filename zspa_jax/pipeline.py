"""Composes the model pieces into the (optionally pruned) sequence the decoder sees.

image -> tower -> projector/merger -> select_tokens -> the K kept tokens replace the N
placeholders -> embeddings, mask and RoPE positions of length L - N + K. Everything is
static-shaped and jittable and goes through the family protocol (models.protocol);
host-side validation lives in `zspa_jax.families` / `zspa_jax.inputs`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from typing import Any

from models.layers import positions_from_mask
from zspa_jax.methods.tower import place_span_tokens, tower_prune
from zspa_jax.pruning import CLS_ATTENTION_METHODS, PruneConfig, _default_batching, select_tokens
from zspa_jax.sharding import constrain


class DecoderInputs(NamedTuple):
    embeds: jax.Array  # [B, L', D]
    mask: jax.Array  # int32 [B, L'], 0 on left padding
    positions: jax.Array  # int32 [B, L'] or [3, B, L'] (M-RoPE)
    kept_indices: jax.Array | None  # int32 [B, K] into the N visual tokens, ascending
    # (visionzip: the placeholder slot each of the K tokens takes, in sequence order)
    next_position: jax.Array  # int32 [B]: RoPE position of the first generated token


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
    model: Any,
    input_ids: jax.Array,
    pixel_values: jax.Array | None,
    attention_mask: jax.Array,
    prune: PruneConfig | None = None,
    special_ids: tuple[int, ...] = (),
    rng: jax.Array | None = None,
    keep_positions: bool = False,
    aux: Any = None,
) -> DecoderInputs:
    """Build the decoder's inputs, pruning visual tokens when `prune` is given.

    input_ids: int [B, L]; pixel_values: the family's image input (LLaVA [M, C, H, W];
    Qwen2.5-VL flattened patches) with one image per row when pruning; attention_mask:
    [B, L]; aux: the family's host-computed arrays (zspa_jax.families). Pruning scores the
    visual tokens against the mean of the raw input-embedding rows of the prompt tokens
    (README.md, "ZSPAPrune, exactly", step 1); padded visual slots (`visual_valid`) are never kept.
    1-D positions are renumbered contiguously (what transformers computes for the pruned
    `inputs_embeds`) unless `keep_positions`; 3-D M-RoPE positions are always kept, and
    decoding then continues after the unpruned prompt's largest position.
    """
    def finish(embeds, mask, positions, kept):
        if mm.next_position is not None:
            nxt = mm.next_position
        else:
            nxt = jnp.max(positions.reshape(-1, *positions.shape[-2:]), axis=(0, 2)) + 1
        # On a mesh: rows stay split over "data" into the decoder (a no-op on one device).
        batch_axis = (None,) * (positions.ndim - 2) + ("data",)  # [B, L] or M-RoPE [3, B, L]
        return DecoderInputs(
            constrain(embeds, "data"), constrain(mask, "data"), constrain(positions, *batch_axis), kept,
            nxt.astype(jnp.int32),
        )

    image_id = model.config.image_token_id
    tower_method = prune is not None and pixel_values is not None and prune.method in CLS_ATTENTION_METHODS
    # VisPruner / VisionZip run the tower themselves ([CLS] attention; zspa_jax.methods.tower).
    mm = model.multimodal_inputs(input_ids, None if tower_method else pixel_values, attention_mask, aux)
    if tower_method:
        n = model.config.image_seq_length
        pruned = tower_prune(model, pixel_values, prune.method, prune.num_keep(n), _default_batching())
        kept = pruned.kept
        # Subset methods keep projected tokens; merging methods bring new ones (their slots in `kept`).
        tokens = pruned.tokens if pruned.tokens is not None else jnp.take_along_axis(pruned.visual, kept[..., None], axis=1)
        base = mm.embeds
    else:
        if prune is None or mm.visual is None or prune.method == "fastv":  # FastV prunes inside the decoder
            return finish(mm.embeds, attention_mask, mm.positions, None)
        n = mm.visual.shape[1]
        prompt_mask = prompt_token_mask(input_ids, attention_mask, image_id, special_ids, prune.prompt_scope)
        kept = select_tokens(
            mm.visual,
            mm.text_embeds,
            prompt_mask,
            keep=prune.num_keep(n),
            method=prune.method,
            core_ratio=prune.core_ratio,
            rng=rng,
            visual_mask=mm.visual_valid,
        )
        tokens, base = None, mm.embeds
    src = pruned_gather_index(input_ids, image_id, kept, n)
    embeds = jnp.take_along_axis(base, src[..., None], axis=1)
    if tokens is not None:
        embeds = place_span_tokens(embeds, input_ids, image_id, tokens)
    mask = jnp.take_along_axis(attention_mask, src, axis=1)
    if mm.positions.ndim == 3 or keep_positions:
        # Original RoPE positions: gaps where pruned tokens were (merged tokens: their slot's).
        positions = jnp.take_along_axis(mm.positions, jnp.broadcast_to(src, mm.positions.shape[:-1] + src.shape[-1:]), axis=-1)
    else:
        positions = positions_from_mask(mask)
    return finish(embeds, mask, positions, kept)
