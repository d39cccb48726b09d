"""Composes the model pieces into the (optionally pruned) sequence the decoder sees.

image(s) -> tower -> projector/merger -> the method -> the K kept tokens replace the N
placeholders -> embeddings, mask and RoPE positions of length L - N + K. A row's N
placeholders may come from several images (models.protocol's visual layout): with
`budget="row"` the method chooses K among all of them, with `budget="image"` it runs on
each image (I images keep I * K). Tower-stage methods run on each tower row (an image, or a
crop where the family's tower layout says so) and keep K of it. Everything is
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
from models.protocol import TowerFeatures, TowerLayout
from zspa_jax.methods import MethodInputs
from zspa_jax.prefill import pruned_gather_index
from zspa_jax.pruning import PruneConfig, default_batching
from zspa_jax.sharding import constrain


class DecoderInputs(NamedTuple):
    embeds: jax.Array  # [B, L', D]
    mask: jax.Array  # int32 [B, L'], 0 on left padding
    positions: jax.Array  # int32 [B, L'] or [3, B, L'] (M-RoPE)
    # int32 [B, K] into the row's N visual tokens (reading order), ascending
    kept_indices: jax.Array | None
    # (merging methods, and tower-stage methods on a tower layout: the placeholder slot each of
    # the K tokens takes, in sequence order; -1 for a masked entry)
    next_position: jax.Array  # int32 [B]: RoPE position of the first generated token
    # int32 [B, N]: placeholder positions (unpruned inputs with images)
    visual_index: jax.Array | None = None
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
    input_ids: jax.Array,
    attention_mask: jax.Array,
    image_token_id: int | tuple[int, ...],
    special_ids: tuple[int, ...],
    scope: str,
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
    kept: jax.Array  # int32 [B, K']: kept visual tokens (merging methods: the slot each token takes); -1 when not real
    tokens: jax.Array | None  # [B, K', D] replacement tokens in the LLM's space (merging methods)
    anchor: jax.Array  # int32 [B, K']: the visual token whose position each entry sits at
    valid: jax.Array | None = None  # bool [B, K']: real entries (None: all)


def _row_group(b: int, n: int) -> jax.Array:
    """int32 [B, 1, N]: the whole row as the one set a method chooses within ("row" budget)."""
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, None], (b, 1, n))


def _choose(mm, groups, prompt, prompt_mask, prune: PruneConfig, rng) -> Chosen:
    """Run the method within each group of slots (int32 [B, G, n], -1 padding) and return
    its choice in row terms."""
    method = prune.record
    b, g, n = groups.shape
    safe = jnp.maximum(groups, 0).reshape(b * g, n)
    if g > 1:  # one method row per group: the row's prompt goes with each of its groups
        prompt, prompt_mask = (jnp.repeat(x, g, axis=0) for x in (prompt, prompt_mask))
    keep = prune.num_keep(n)
    visual = jnp.take_along_axis(mm.visual, safe.reshape(b, g * n)[..., None], axis=1).reshape(
        b * g, n, -1
    )
    valid = (groups >= 0).reshape(b * g, n)
    if mm.visual_valid is not None:
        valid &= jnp.take_along_axis(mm.visual_valid, safe.reshape(b, g * n), axis=1).reshape(
            b * g, n
        )
    grid = None
    if mm.image_grid is not None and mm.image_grid.shape[1] == g:  # each group is one image
        grid = mm.image_grid.reshape(b * g, 2)
    inputs = MethodInputs(visual, valid, prompt, prompt_mask, rng, None, grid)
    sel = method.select(
        inputs, keep=keep, batching=default_batching(), **method.select_options(prune.options)
    )
    # Back to row terms: group-local indices -> the row's slots, groups in reading order.
    kept = jnp.take_along_axis(safe, sel.kept, axis=1).reshape(b, g * keep)
    if sel.tokens is None:
        return Chosen(kept, None, kept)
    first = jnp.repeat(safe[:, :1], keep, axis=1).reshape(
        b, g * keep
    )  # merged tokens sit where their group starts
    return Chosen(kept, sel.tokens.reshape(b, g * keep, -1), first)


def trivial_tower_layout(b: int, m: int, p: int) -> TowerLayout:
    """models.protocol's default layout: batch row b's R = M / B tower rows are its images in
    reading order, tower token j of its i-th image is slot i * P + j; each image is its own
    map, entries in the method's order."""
    r = m // b
    slot = jnp.tile(jnp.arange(r * p, dtype=jnp.int32).reshape(r, p), (b, 1))
    order = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (m, p))
    start = jnp.tile(jnp.arange(r, dtype=jnp.int32) * p, b)
    return TowerLayout(slot, order, start, jnp.zeros((m,), bool), r * p)


def _choose_tower(
    model, tower: TowerFeatures, b: int, prompt, prompt_mask, prune: PruneConfig, rng
) -> Chosen:
    """Run a tower-stage method on each tower row (K of its P tokens) and lay the kept
    tokens out in row terms as the tower layout says (models.protocol.TowerLayout)."""
    method = prune.record
    m, p = tower.features.shape[:2]
    layout = tower.layout if tower.layout is not None else trivial_tower_layout(b, m, p)
    r = m // b
    if r > 1:  # one method row per tower row: the row's prompt goes with each of them
        prompt, prompt_mask = (jnp.repeat(x, r, axis=0) for x in (prompt, prompt_mask))
    keep = prune.num_keep(p)
    inputs = MethodInputs(
        tower.features, None, prompt, prompt_mask, rng, tower.cls_attention, None, tower.layer
    )
    sel = method.select(
        inputs, keep=keep, batching=default_batching(), **method.select_options(prune.options)
    )
    local = (
        sel.kept
    )  # [M, K]: tower-token index (merging methods: the token whose slot each entry takes)
    tokens = (
        sel.tokens
        if sel.tokens is not None
        else jnp.take_along_axis(tower.features, local[..., None], axis=1)
    )
    tokens = model.project_tower_features(tokens.astype(tower.features.dtype))
    slot = jnp.take_along_axis(layout.slot, local, axis=1)
    order = jnp.take_along_axis(layout.order, local, axis=1)
    kind = jnp.zeros_like(local) if sel.kind is None else sel.kind.astype(jnp.int32)
    interleave = layout.interleave[:, None]
    entry = jnp.arange(m * keep, dtype=jnp.int32).reshape(
        m, keep
    )  # tower row, then the method's order
    # Sort keys, most significant first: real entries, map, kind (interleaved maps), then the
    # reading order (an interleaved map's own tokens) or the entry order.
    to_row = lambda x: x.reshape(b, r * keep)
    valid = to_row(slot >= 0)
    start = to_row(jnp.broadcast_to(layout.start[:, None], (m, keep)))
    k_kind = to_row(jnp.where(interleave, kind, 0))
    k_order = to_row(jnp.where(interleave & (kind == 0), order, entry))
    perm = jnp.lexsort((k_order, k_kind, start, (~valid).astype(jnp.int32)), axis=1)
    take = lambda x: jnp.take_along_axis(x, perm, axis=1)
    valid, start, slot = take(valid), take(start), take(to_row(slot))
    tokens = jnp.take_along_axis(tokens.reshape(b, r * keep, -1), perm[..., None], axis=1)
    # Masked entries (padding rows) sit after the row's last map: nothing real follows them.
    last = jnp.max(jnp.where(valid, start, 0), axis=1, keepdims=True)
    anchor = jnp.where(valid, start, last)
    return Chosen(jnp.where(valid, slot, -1), tokens, anchor, valid)


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
            constrain(embeds, "data"),
            constrain(mask, "data"),
            constrain(positions, *batch_axis),
            kept,
            nxt.astype(jnp.int32),
            **span,
        )

    image_id = visual_token_ids(model.config)
    pruning = prune is not None and pixel_values is not None
    tower_stage = pruning and prune.record.stage == "tower"
    # Tower-stage methods run the tower themselves ([CLS] attention).
    mm = model.multimodal_inputs(
        input_ids, None if tower_stage else pixel_values, attention_mask, aux
    )
    if not pruning or (mm.visual is None and not tower_stage):
        return finish(mm.embeds, attention_mask, mm.positions, None)
    b, length = input_ids.shape
    tower = None
    if tower_stage:  # tower rows (laid out by the host) and where their tokens go
        tower = model.cls_tower(pixel_values, aux)
        m, p = tower.features.shape[:2]
        if m % b:
            raise ValueError(
                f"the tower has {m} rows for a batch of {b}; every row must hold the same number of images"
            )
        n = tower.layout.num_slots if tower.layout is not None else (m // b) * p
        groups, valid = None, None
    else:
        n = mm.visual.shape[1]
        groups = mm.image_index if prune.budget == "image" else _row_group(b, n)
        valid = mm.visual_valid
    slots = placeholder_slots(input_ids, image_id, n)
    prompt_mask = prompt_token_mask(
        input_ids, attention_mask, image_id, special_ids, prune.prompt_scope
    )
    if prune.record.llm_layer:  # pruned at its layer (zspa_jax.prefill)
        valid = jnp.take_along_axis(attention_mask, slots, axis=1) != 0 if valid is None else valid
        return finish(
            mm.embeds,
            attention_mask,
            mm.positions,
            None,
            visual_index=slots,
            visual_valid=valid,
            prompt_mask=prompt_mask,
        )
    if tower is not None:
        chosen = _choose_tower(model, tower, b, mm.text_embeds, prompt_mask, prune, rng)
    else:
        chosen = _choose(mm, groups, mm.text_embeds, prompt_mask, prune, rng)
    kept_slots = jnp.take_along_axis(slots, jnp.maximum(chosen.kept, 0), axis=1)
    src, entry = pruned_gather_index(
        slots, kept_slots, length, jnp.take_along_axis(slots, chosen.anchor, axis=1)
    )
    embeds = jnp.take_along_axis(mm.embeds, src[..., None], axis=1)
    if chosen.tokens is not None:
        placed = jnp.take_along_axis(chosen.tokens, jnp.maximum(entry, 0)[..., None], axis=1)
        embeds = jnp.where((entry >= 0)[..., None], placed.astype(embeds.dtype), embeds)
    mask = jnp.take_along_axis(attention_mask, src, axis=1)
    if chosen.valid is not None:  # entries that are not real (a padding tower row) are masked
        real = jnp.take_along_axis(chosen.valid, jnp.maximum(entry, 0), axis=1)
        mask = jnp.where((entry >= 0) & ~real, 0, mask)
    if mm.positions.ndim == 3 or keep_positions or prune.record.keeps_positions:
        # Original RoPE positions: gaps where pruned tokens were (merged tokens: their slot's).
        positions = jnp.take_along_axis(
            mm.positions, jnp.broadcast_to(src, mm.positions.shape[:-1] + src.shape[-1:]), axis=-1
        )
    else:
        positions = positions_from_mask(mask)
    return finish(embeds, mask, positions, chosen.kept)
