"""The host rules every family shares, computed once: a family's checked spans -> a `HostBatch`.

A family's adapter (`Family.adapter`, zspa_jax.families.base) checks its arrays and says
how many placeholders each image or video of each row has (`Spans`); this module then
applies the rules that do not depend on the family, in numpy before any compile:

  * how many placeholders pruning keeps and drops per row (K, or I x K under
    budget="image", or K per tower row for a tower-stage method on crops);
  * slot padding: under pruning every row gets the same N placeholders (masked ones
    after its real ones), a multiple of the family's slot bucket;
  * the prompt bucket: a prompt is left-padded so that its (pruned) length is
    `prompt_bucket(length)`, so prompts of nearby lengths share compiled programs;
  * the position budget: the (pruned) prompt plus the new tokens must fit the model's
    positions.

The adapter then lays out its own arrays for the final ids (`FamilyLayout`: pixels, the
aux pytree, grids, positions). Nothing here names a family or a method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from zspa_jax.validation import check_binary_mask, is_traced

__all__ = [
    "HostBatch",
    "build_host_batch",
    "check_ids_and_mask",
    "check_left_padded",
    "left_pad",
    "pad_visual_slots",
    "prompt_bucket",
    "round_up",
]


class HostBatch(NamedTuple):
    """A validated batch as the jitted programs take it."""

    input_ids: Any  # int [B, L] (numpy, or the caller's arrays where the family allows tracing)
    attention_mask: Any  # int [B, L] or None (all real)
    pixel_values: np.ndarray | None
    aux: Any  # the family's pytree for `multimodal_inputs` (None when it needs none)
    num_visual: int  # placeholder slots per row N when laid out for pruning, else 0
    min_visual: int  # fewest real visual tokens in a row (what a prune ratio applies to)
    prompt_tokens: np.ndarray | None  # int [B]: real prompt tokens per row before any padding
    visual_per_row: np.ndarray | None = None  # int [B]: real visual tokens per row
    image_grid: np.ndarray | None = None  # int [B, I, 2]: each image's token grid (rows, cols)
    rows: int | None = None  # the caller's rows when the batch was padded for a mesh
    images_per_row: np.ndarray | None = None  # int [B]: images (and videos) in each row
    min_image_visual: int = 0  # fewest real visual tokens of one image (a per-image ratio's N)
    # Tower-stage methods on a family whose tower rows are not its images (e.g. crops):
    # the tower rows of each row, each keeping K (0: K per image, or per row)
    tower_rows_per_row: int = 0
    # Slots the LLM prefill caches per row: L - N + kept when pruning before the LLM, else L
    llm_length: int = 0


class Spans(NamedTuple):
    """What a family's adapter checked (`HostAdapter.spans`): its arrays and, per row, how
    many placeholders each visual item (image or video, reading order) takes."""

    input_ids: Any  # int [B, L]: numpy, or the caller's traced arrays where the family allows
    attention_mask: Any  # int [B, L] of 0/1: numpy, or the caller's (traced, or None)
    items: list[list[int]] | None  # per row, each item's real placeholders; None: no visual input
    placeholder_ids: tuple[int, ...] = ()  # the placeholder token ids (image, video)
    # Per row, the placeholders each item's shapes take (>= items: a family's buckets,
    # e.g. a video's temporal bucket); None: as items
    item_slots: list[list[int]] | None = None
    slot_multiple: int = 1  # under pruning, each row's slots are a multiple of this
    tower_rows_per_row: int = 0  # a tower-stage method keeps K of each of these tower rows
    tower_row_tokens: int = 0  # ...of this many tokens each (what keep is bounded by then)
    state: Any = None  # the family's own checked arrays, handed back to `HostAdapter.layout`


class FamilyLayout(NamedTuple):
    """What a family's adapter lays out for the final ids (`HostAdapter.layout`)."""

    pixel_values: Any  # the pixel array the family's programs take, or None
    aux: Any = None  # the family's pytree for `multimodal_inputs`
    image_grid: np.ndarray | None = None  # int [B, I, 2]: each image's token grid, when grids
    # int [B]: the next position of each row where the family numbers positions itself
    # (e.g. 3-D positions); None: 1-D positions that follow the mask
    next_position: np.ndarray | None = None


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def prompt_bucket(length: int) -> int:
    """The length a prompt of `length` tokens is left-padded to, so that prompts of nearby
    lengths share compiled programs: the next multiple of 16 up to 256 tokens, of 32 up to
    512, of 64 beyond. A short (e.g. pruned) prompt pays at most 15 padding slots, a longer
    one under 1/8 of its length, and never more than 64-token steps would add; 48 buckets
    up to 2048 tokens."""
    length = max(int(length), 1)
    return round_up(length, 16 if length <= 256 else 32 if length <= 512 else 64)


def left_pad(
    ids: np.ndarray, mask: np.ndarray, bucket: Callable[[int], int], pad_id: int, dropped: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad [B, L] ids (pad_id) and mask (0) so that L - `dropped` becomes
    `bucket(L - dropped)` (e.g. `prompt_bucket`: fewer compiles). `dropped`: the
    placeholders pruning removes before the LLM (N - K), so a pruned prompt is padded to its
    own length's bucket, not the unpruned one's."""
    extra = bucket(ids.shape[1] - dropped) - (ids.shape[1] - dropped)
    return _left_pad_by(ids, mask, extra, pad_id)


def _left_pad_by(ids: np.ndarray, mask: np.ndarray, extra: int, pad_id: int):
    if extra <= 0:
        return ids, mask
    return np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(
        mask, ((0, 0), (extra, 0))
    )


def pad_visual_slots(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_id: int | tuple[int, ...],
    slots: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Give every row exactly `slots` placeholders (the visual layout of models.protocol).

    `token_id`: the placeholder id, or several (image and video). The added slots (the id of
    the row's last real placeholder, mask 0) go right after it, so each row's real
    placeholders come first, in reading order; they are masked out of attention and skipped
    by positions. Rows are re-left-padded to one length. Returns (input_ids,
    attention_mask) int32 [B, L'].
    """
    ids_of = (token_id,) if isinstance(token_id, (int, np.integer)) else tuple(token_id)
    rows_ids, rows_mask = [], []
    for ids, mask in zip(input_ids, attention_mask):
        real = np.flatnonzero(np.isin(ids, ids_of) & (mask != 0))
        at = real[-1] + 1 if real.size else ids.size
        fill = ids[real[-1]] if real.size else ids_of[0]
        extra = slots - real.size
        rows_ids.append(np.concatenate([ids[:at], np.full(extra, fill), ids[at:]]))
        rows_mask.append(np.concatenate([mask[:at], np.zeros(extra, mask.dtype), mask[at:]]))
    length = max(r.size for r in rows_ids)
    ids = np.stack([np.pad(r, (length - r.size, 0), constant_values=pad_id) for r in rows_ids])
    mask = np.stack([np.pad(r, (length - r.size, 0)) for r in rows_mask])
    return ids.astype(np.int32), mask.astype(np.int32)


def check_ids_and_mask(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """Host ids int [B, L] and a 0/1, left-padded mask (all ones when None)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"input_ids must be an integer array [batch, length], got shape {ids.shape} ({ids.dtype})"
        )
    if attention_mask is None:
        return ids, np.ones(ids.shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}"
        )
    check_binary_mask("attention_mask", mask)
    check_left_padded(mask)
    return ids, mask.astype(np.int32)


def check_left_padded(mask) -> None:
    if (np.asarray(mask)[:, -1] == 0).any():
        raise ValueError(
            "attention_mask must be left-padded: the last position of every row must be a real token"
        )


# --------------------------------------------------------------------------- the shared rules


class _Kept(NamedTuple):
    per_row: int  # visual tokens each row keeps (what replaces its N placeholders)
    min_visual: int  # what keep is bounded by and a row-budget ratio applies to
    min_image: int  # ... and a per-image ratio


def _kept(prune, spans: Spans, min_visual: int, min_image: int, images: int) -> _Kept:
    """Visual tokens each row keeps under `prune` (a keep too large for the batch raises)."""
    if spans.tower_rows_per_row and prune.record.needs_cls_attention:
        tokens = spans.tower_row_tokens  # K of every tower row
        return _Kept(prune.keep_for(tokens, tokens) * spans.tower_rows_per_row, tokens, tokens)
    return _Kept(prune.row_keep(min_visual, min_image, images), min_visual, min_image)


def check_positions(max_positions: int, prompt: int, extra_length: int) -> None:
    """The (pruned) prompt's positions plus the new tokens must fit the model's positions."""
    if prompt + extra_length > max_positions:
        raise ValueError(
            f"the prompt ({prompt} positions after pruning) plus max_new_tokens ({extra_length}) needs "
            f"{prompt + extra_length} positions; the model allows at most {max_positions}"
        )


def build_host_batch(
    vlm,
    adapter,
    input_ids,
    pixel_values,
    attention_mask,
    extras: dict,
    prune,
    extra_length: int = 0,
    bucket: bool = False,
    prompt_bucket: Callable[[int], int] | None = None,
) -> HostBatch:
    """The adapter's spans through the shared rules, then the adapter's layout (module
    docstring). `prompt_bucket`: left-pad each prompt to the length it gives."""
    spans = adapter.spans(vlm, input_ids, pixel_values, attention_mask, extras, prune, bucket)
    ids, mask = spans.input_ids, spans.attention_mask
    traced = is_traced(ids, mask)
    pruning = prune is not None and spans.items is not None
    max_positions = vlm.config.text.max_position_embeddings
    if spans.items is None:  # text only
        prompt_tokens = None if traced else np.asarray(mask).sum(1)
        if prompt_bucket and not traced:
            ids, mask = left_pad(ids, mask, prompt_bucket, vlm.pad_token_id)
        layout = adapter.layout(vlm, spans, ids, mask, None)
        positions = _prompt_positions(layout, prompt_tokens, ids, 0)
        check_positions(max_positions, positions, extra_length)
        length = int(np.shape(ids)[1])
        return HostBatch(ids, mask, None, layout.aux, 0, 0, prompt_tokens, llm_length=length)

    tokens = spans.items
    slots_of = spans.item_slots or tokens
    per_row = np.asarray([sum(r) for r in tokens], np.int64)
    images = np.asarray([len(r) for r in tokens], np.int64)
    min_image = min(c for r in tokens for c in r)
    kept = _Kept(0, int(per_row.min()), min_image)
    slots = dropped = 0
    if pruning:
        kept = _kept(prune, spans, int(per_row.min()), min_image, int(images.max()))
        slots = max(sum(r) for r in slots_of)
        if bucket and spans.slot_multiple > 1:
            slots = round_up(slots, spans.slot_multiple)
        if not traced and slots > per_row.min():  # the visual layout: N slots in every row
            ids, mask = pad_visual_slots(ids, mask, spans.placeholder_ids, slots, vlm.pad_token_id)
        dropped = 0 if prune.record.llm_layer else slots - kept.per_row
    elif not traced and spans.item_slots is not None:
        # Unpruned: left padding for the slots an item's shapes take beyond its tokens, so
        # the prompt length follows the family's buckets only.
        extra = np.asarray([sum(s) - sum(t) for s, t in zip(slots_of, tokens)])
        target = int((np.asarray(mask).sum(1) + extra).max())
        ids, mask = _left_pad_by(ids, mask, target - ids.shape[1], vlm.pad_token_id)
    prompt_tokens = None if traced else np.asarray(spans.attention_mask).sum(1)
    if prompt_bucket and not traced:
        ids, mask = left_pad(ids, mask, prompt_bucket, vlm.pad_token_id, dropped)
    layout = adapter.layout(vlm, spans, ids, mask, slots if pruning else None)
    saved = 0
    if pruning and not prune.record.llm_layer:
        saved = int(per_row.min()) - kept.per_row
    check_positions(
        max_positions, _prompt_positions(layout, prompt_tokens, ids, saved), extra_length
    )
    return HostBatch(
        ids,
        mask,
        layout.pixel_values,
        layout.aux,
        slots,
        kept.min_visual,
        prompt_tokens,
        per_row,
        image_grid=layout.image_grid,
        images_per_row=images,
        min_image_visual=kept.min_image,
        tower_rows_per_row=spans.tower_rows_per_row if pruning else 0,
        llm_length=int(np.shape(ids)[1]) - dropped,
    )


def _prompt_positions(layout: FamilyLayout, prompt_tokens, ids, saved: int) -> int:
    """Positions the prompt takes: the family's own next position (e.g. 3-D), or the longest
    row's real tokens (the padded length when traced) less what pruning removes."""
    if layout.next_position is not None:
        return int(np.max(layout.next_position)) if np.size(layout.next_position) else 0
    longest = int(np.shape(ids)[1]) if prompt_tokens is None else int(np.max(prompt_tokens))
    return longest - saved
