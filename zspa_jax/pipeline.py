"""Composes the model pieces into the (optionally pruned) sequence the decoder sees.

image(s) -> tower -> projector/merger -> the method -> the K kept tokens replace the N
placeholders -> embeddings, mask and RoPE positions of length L - N + K. A row's N
placeholders may come from several images (models.protocol's visual layout): with
`budget="row"` the method chooses K among all of them, with `budget="image"` it runs on
each image (I images keep I * K). Everything is
static-shaped and jittable and goes through the family protocol (models.protocol) and
the method record (zspa_jax.methods); it names neither a family nor a method. Methods
that run inside the LLM get the unpruned inputs here plus where the visual span is
(`zspa_jax.prefill` prunes them at their layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models.layers import placeholder_slots, positions_from_mask
from zspa_jax.methods import MethodInputs, Selection
from zspa_jax.prefill import pruned_gather_index
from zspa_jax.pruning import PruneConfig, default_batching
from zspa_jax.sharding import constrain


class DecoderInputs(NamedTuple):
    embeds: jax.Array  # [B, L', D]
    mask: jax.Array  # int32 [B, L'], 0 on left padding
    positions: jax.Array  # int32 [B, L'] or [3, B, L'] (M-RoPE)
    kept_indices: jax.Array | None  # int32 [B, K] into the row's N visual tokens (reading order), ascending
    # (merging methods: the placeholder slot each of the K tokens takes, in sequence order)
    next_position: jax.Array  # int32 [B]: RoPE position of the first generated token
    visual_index: jax.Array | None = None  # int32 [B, N]: placeholder positions (unpruned inputs with images)
    visual_valid: jax.Array | None = None  # bool [B, N]: real placeholders
    prompt_mask: jax.Array | None = None  # bool [B, L]: "the prompt" (unpruned inputs with images)


def visual_token_ids(config) -> tuple[int, ...]:
    """The placeholder ids of a family's config: its image token, and its video token where
    it has one (`visual_token_ids` overrides both)."""
    ids = getattr(config, "visual_token_ids", None)
    if ids is not None:
        return tuple(ids)
    video = getattr(config, "video_token_id", None)
    return (config.image_token_id,) + (() if video is None else (video,))


def prompt_token_mask(
    input_ids: jax.Array, attention_mask: jax.Array, image_token_id: int | tuple[int, ...],
    special_ids: tuple[int, ...], scope: str,
) -> jax.Array:
    """bool [B, L]: which tokens form "the prompt" for relevance scoring.

    "all_text": every real non-placeholder token; "question": those after the last
    placeholder (`image_token_id`: one id or several, e.g. image and video). Special tokens
    (BOS, EOS, pad, ...) never count.
    """
    ids = (image_token_id,) if isinstance(image_token_id, int) else tuple(image_token_id)
    is_image = jnp.isin(input_ids, jnp.asarray(ids, input_ids.dtype))
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


class Chosen(NamedTuple):
    kept: jax.Array  # int32 [B, K']: kept visual tokens (merging methods: the slot each token takes)
    tokens: jax.Array | None  # [B, K', D] replacement tokens in the LLM's space (merging methods)
    anchor: jax.Array  # int32 [B, K']: the visual token whose position each entry sits at


def _groups(b: int, n: int, images: int, budget: str) -> jax.Array:
    """int32 [B, G, n']: the sets a method chooses within, as slots into the row's N: the
    whole row ("row" budget: G = 1), or each of the row's I images of N / I slots
    ("image" budget; the families' image_index says the same for images of one size)."""
    slots = jnp.arange(n, dtype=jnp.int32)
    shape = (images, n // images) if budget == "image" else (1, n)
    return jnp.broadcast_to(slots.reshape(shape), (b,) + shape)


def _choose(model, mm, tower, groups, prompt, prompt_mask, prune: PruneConfig, rng) -> Chosen:
    """Run the method within each group of slots (int32 [B, G, n], -1 padding) and return
    its choice in row terms (tower: the [CLS] tower's output for tower-stage methods)."""
    method = prune.record
    batching = default_batching()
    b, g, n = groups.shape
    safe = jnp.maximum(groups, 0).reshape(b * g, n)
    if g > 1:  # one method row per group: the row's prompt goes with each of its groups
        prompt, prompt_mask = (jnp.repeat(x, g, axis=0) for x in (prompt, prompt_mask))
    keep = prune.num_keep(n)
    if tower is not None:  # the tower's rows are the images
        inputs = MethodInputs(tower.features, None, prompt, prompt_mask, rng, tower.cls_attention, None, tower.layer)
        sel = method.select(inputs, keep=keep, core_ratio=prune.core_ratio, batching=batching)
        tokens = sel.tokens if sel.tokens is not None else jnp.take_along_axis(tower.features, sel.kept[..., None], axis=1)
        sel = Selection(sel.kept, model.project_tower_features(tokens.astype(tower.features.dtype)))
    else:
        visual = jnp.take_along_axis(mm.visual, safe.reshape(b, g * n)[..., None], axis=1).reshape(b * g, n, -1)
        valid = (groups >= 0).reshape(b * g, n)
        if mm.visual_valid is not None:
            valid &= jnp.take_along_axis(mm.visual_valid, safe.reshape(b, g * n), axis=1).reshape(b * g, n)
        grid = None
        if mm.image_grid is not None and mm.image_grid.shape[1] == g:  # each group is one image
            grid = mm.image_grid.reshape(b * g, 2)
        inputs = MethodInputs(visual, valid, prompt, prompt_mask, rng, None, grid)
        sel = method.select(inputs, keep=keep, core_ratio=prune.core_ratio, batching=batching)
    # Back to row terms: group-local indices -> the row's slots, groups in reading order.
    kept = jnp.take_along_axis(safe, sel.kept, axis=1).reshape(b, g * keep)
    if sel.tokens is None:
        return Chosen(kept, None, kept)
    first = jnp.repeat(safe[:, :1], keep, axis=1).reshape(b, g * keep)  # merged tokens sit where their group starts
    return Chosen(kept, sel.tokens.reshape(b, g * keep, -1), first)


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

    input_ids: int [B, L]; pixel_values: the family's image input, laid out by its host
    adapter when pruning; attention_mask: [B, L]; aux: the family's host-computed arrays
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

    image_id = visual_token_ids(model.config)
    pruning = prune is not None and pixel_values is not None
    tower_stage = pruning and prune.record.stage == "tower"
    # Tower-stage methods run the tower themselves ([CLS] attention).
    mm = model.multimodal_inputs(input_ids, None if tower_stage else pixel_values, attention_mask, aux)
    if not pruning or (mm.visual is None and not tower_stage):
        return finish(mm.embeds, attention_mask, mm.positions, None)
    b, length = input_ids.shape
    tower = None
    if tower_stage:  # one tower row per image, I images of P tokens per row (laid out by the host)
        tower = model.cls_tower(pixel_values, prune.method)
        images = pixel_values.shape[0] // b
        n = images * tower.features.shape[1]
        groups, valid = _groups(b, n, images, prune.budget), None
    else:
        n = mm.visual.shape[1]
        groups = mm.image_index if prune.budget == "image" else _groups(b, n, 1, "row")
        valid = mm.visual_valid
    slots = placeholder_slots(input_ids, image_id, n)
    prompt_mask = prompt_token_mask(input_ids, attention_mask, image_id, special_ids, prune.prompt_scope)
    if prune.record.llm_layer:  # pruned at its layer (zspa_jax.prefill)
        valid = jnp.take_along_axis(attention_mask, slots, axis=1) != 0 if valid is None else valid
        return finish(mm.embeds, attention_mask, mm.positions, None, visual_index=slots, visual_valid=valid,
                      prompt_mask=prompt_mask)
    chosen = _choose(model, mm, tower, groups, mm.text_embeds, prompt_mask, prune, rng)
    kept_slots = jnp.take_along_axis(slots, chosen.kept, axis=1)
    src, entry = pruned_gather_index(slots, kept_slots, length, jnp.take_along_axis(slots, chosen.anchor, axis=1))
    embeds = jnp.take_along_axis(mm.embeds, src[..., None], axis=1)
    if chosen.tokens is not None:
        placed = jnp.take_along_axis(chosen.tokens, jnp.maximum(entry, 0)[..., None], axis=1)
        embeds = jnp.where((entry >= 0)[..., None], placed.astype(embeds.dtype), embeds)
    mask = jnp.take_along_axis(attention_mask, src, axis=1)
    if mm.positions.ndim == 3 or keep_positions or prune.record.keeps_positions:
        # Original RoPE positions: gaps where pruned tokens were (merged tokens: their slot's).
        positions = jnp.take_along_axis(mm.positions, jnp.broadcast_to(src, mm.positions.shape[:-1] + src.shape[-1:]), axis=-1)
    else:
        positions = positions_from_mask(mask)
    return finish(embeds, mask, positions, chosen.kept)
