"""Composes the model pieces into the (optionally pruned) sequence the decoder sees.

image -> tower -> projector/merger -> the method -> the K kept tokens replace the N
placeholders -> embeddings, mask and RoPE positions of length L - N + K. Everything is
static-shaped and jittable and goes through the family protocol (models.protocol) and
the method record (zspa_jax.methods); it names neither a family nor a method. Methods
that run inside the LLM get the unpruned inputs here plus where the visual span is
(`zspa_jax.prefill` prunes them at their layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models.layers import positions_from_mask
from zspa_jax.methods import MethodInputs, Selection
from zspa_jax.prefill import pruned_gather_index
from zspa_jax.pruning import PruneConfig, default_batching
from zspa_jax.sharding import constrain


class DecoderInputs(NamedTuple):
    embeds: jax.Array  # [B, L', D]
    mask: jax.Array  # int32 [B, L'], 0 on left padding
    positions: jax.Array  # int32 [B, L'] or [3, B, L'] (M-RoPE)
    kept_indices: jax.Array | None  # int32 [B, K] into the N visual tokens, ascending
    # (merging methods: the placeholder slot each of the K tokens takes, in sequence order)
    next_position: jax.Array  # int32 [B]: RoPE position of the first generated token
    visual_start: jax.Array | None = None  # int32 [B]: first visual slot (unpruned inputs with images)
    visual_valid: jax.Array | None = None  # bool [B, N]: real slots of the span (None: all)
    prompt_mask: jax.Array | None = None  # bool [B, L]: "the prompt" (unpruned inputs with images)


def prompt_token_mask(
    input_ids: jax.Array, attention_mask: jax.Array, image_token_id: int, special_ids: tuple[int, ...], scope: str
) -> jax.Array:
    """bool [B, L]: which tokens form "the prompt" for relevance scoring.

    "all_text": every real non-image token; "question": those after the image span.
    Special tokens (BOS, EOS, pad, ...) never count.
    """
    is_image = input_ids == image_token_id
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


def place_span_tokens(embeds: jax.Array, start: jax.Array, tokens: jax.Array) -> jax.Array:
    """Write tokens [B, K, D] over the pruned row's visual span [s_b, s_b + K) of embeds [B, L', D]
    (the span start is the same before and after pruning, since only the span shrinks)."""
    keep = tokens.shape[1]
    start = start[:, None]
    j = jnp.arange(embeds.shape[1])[None, :]
    in_span = (j >= start) & (j < start + keep)
    picked = jnp.take_along_axis(tokens, jnp.clip(j - start, 0, keep - 1)[..., None], axis=1)
    return jnp.where(in_span[..., None], picked.astype(embeds.dtype), embeds)


def _select(model, mm, pixel_values, prompt, prompt_mask, prune: PruneConfig, rng) -> tuple[Selection, int]:
    """Run the method: (its selection, with tokens in the LLM's space or None for the kept
    visual tokens themselves; N)."""
    method = prune.record
    batching = default_batching()
    if method.stage == "tower":  # reads the tower's [CLS] attention; projects what it keeps
        tower = model.cls_tower(pixel_values, method.name)
        n = tower.features.shape[1]
        inputs = MethodInputs(tower.features, None, prompt, prompt_mask, rng, tower.cls_attention, None, tower.layer)
        sel = method.select(inputs, keep=prune.num_keep(n), core_ratio=prune.core_ratio, batching=batching)
        tokens = sel.tokens if sel.tokens is not None else jnp.take_along_axis(tower.features, sel.kept[..., None], axis=1)
        return Selection(sel.kept, model.project_tower_features(tokens.astype(tower.features.dtype))), n
    n = mm.visual.shape[1]
    inputs = MethodInputs(mm.visual, mm.visual_valid, prompt, prompt_mask, rng, None, mm.visual_grid)
    return method.select(inputs, keep=prune.num_keep(n), core_ratio=prune.core_ratio, batching=batching), n


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

    input_ids: int [B, L]; pixel_values: the family's image input with one image per row
    when pruning; attention_mask: [B, L]; aux: the family's host-computed arrays
    (zspa_jax.families). Pruning scores the visual tokens against the mean of the raw
    input-embedding rows of the prompt tokens (README.md, "ZSPAPrune, exactly", step 1);
    padded visual slots (`visual_valid`) are never kept. 1-D positions are renumbered
    contiguously (what transformers computes for the pruned `inputs_embeds`) unless
    `keep_positions` or the method keeps positions; 3-D M-RoPE positions are always kept,
    and decoding then continues after the unpruned prompt's largest position.
    """
    def finish(embeds, mask, positions, kept, **span):
        if mm.next_position is not None:
            nxt = mm.next_position
        else:
            nxt = jnp.max(positions.reshape(-1, *positions.shape[-2:]), axis=(0, 2)) + 1
        # On a mesh: rows stay split over "data" into the decoder (a no-op on one device).
        batch_axis = (None,) * (positions.ndim - 2) + ("data",)  # [B, L] or M-RoPE [3, B, L]
        return DecoderInputs(
            constrain(embeds, "data"), constrain(mask, "data"), constrain(positions, *batch_axis), kept,
            nxt.astype(jnp.int32), **span,
        )

    image_id = model.config.image_token_id
    pruning = prune is not None and pixel_values is not None
    tower_stage = pruning and prune.record.stage == "tower"
    # Tower-stage methods run the tower themselves ([CLS] attention).
    mm = model.multimodal_inputs(input_ids, None if tower_stage else pixel_values, attention_mask, aux)
    if not pruning or (mm.visual is None and not tower_stage):
        return finish(mm.embeds, attention_mask, mm.positions, None)
    start = jnp.argmax(input_ids == image_id, axis=1).astype(jnp.int32)  # each row's one visual span
    prompt_mask = prompt_token_mask(input_ids, attention_mask, image_id, special_ids, prune.prompt_scope)
    if prune.record.llm_layer:  # pruned at its layer (zspa_jax.prefill); the mask's width is N
        valid = mm.visual_valid if mm.visual_valid is not None else jnp.ones(mm.visual.shape[:2], bool)
        return finish(mm.embeds, attention_mask, mm.positions, None, visual_start=start, visual_valid=valid,
                      prompt_mask=prompt_mask)
    sel, n = _select(model, mm, pixel_values, mm.text_embeds, prompt_mask, prune, rng)
    src = pruned_gather_index(start, sel.kept, n, input_ids.shape[1])
    embeds = jnp.take_along_axis(mm.embeds, src[..., None], axis=1)
    if sel.tokens is not None:
        embeds = place_span_tokens(embeds, start, sel.tokens)
    mask = jnp.take_along_axis(attention_mask, src, axis=1)
    if mm.positions.ndim == 3 or keep_positions or prune.record.keeps_positions:
        # Original RoPE positions: gaps where pruned tokens were (merged tokens: their slot's).
        positions = jnp.take_along_axis(mm.positions, jnp.broadcast_to(src, mm.positions.shape[:-1] + src.shape[-1:]), axis=-1)
    else:
        positions = positions_from_mask(mask)
    return finish(embeds, mask, positions, sel.kept)
