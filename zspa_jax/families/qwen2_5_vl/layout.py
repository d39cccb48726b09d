"""Qwen2.5-VL's host-side layout: everything that depends on `image_grid_thw`, in numpy.

Window order and its inverse, the tower's 2-D rotary positions and attention segments
(`vision_layout`), the LLM's 3-D M-RoPE positions as transformers' `get_rope_index`
(`rope_index`), and the whole checked batch (`prepare_batch`), so that the jitted
programs only see arrays of static shape (`models.qwen2_5_vl.VisionLayout`, `QwenAux`).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig, QwenAux, VisionLayout, window_slots
from zspa_jax.families.base import image_slot_index, left_pad, pad_visual_slots, round_up

__all__ = [
    "PreparedBatch", "check_grid", "image_spans", "image_token_counts", "num_patches", "num_windows",
    "prepare_batch", "rope_index", "vision_layout",
]


def check_grid(grid_thw, cfg: Qwen2_5_VLVisionConfig, name: str = "image_grid_thw") -> np.ndarray:
    """int64 [n, 3] with every row a valid image grid, else ValueError naming `name`."""
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name} must be an integer array [num_images, 3] of (t, h, w), got shape {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [num_images, 3] of (t, h, w), got dtype {grid.dtype}")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1:
            raise ValueError(f"{name}[{i}] = ({t}, {h}, {w}): t must be >= 1 (frames in temporal patches)")
        if t != 1:
            raise ValueError(f"{name}[{i}] has t={t}; images have t=1 (video input is not supported)")
        if h < m or w < m or h % m or w % m:
            raise ValueError(
                f"{name}[{i}] = ({t}, {h}, {w}): h and w must be positive multiples of spatial_merge_size={m} "
                "(the image is too small for one merged token, or not from the Qwen2-VL image processor)"
            )
    return grid.astype(np.int64)


def num_patches(grid_thw: np.ndarray) -> int:
    return int(np.prod(np.asarray(grid_thw), axis=-1).sum())


def num_windows(grid_thw, cfg: Qwen2_5_VLVisionConfig) -> int:
    """Non-empty windows of all images (what the tower's slot count is made of)."""
    win, m = cfg.window_merged, cfg.spatial_merge_size
    return int(sum(t * -(-(h // m) // win) * -(-(w // m) // win) for t, h, w in np.asarray(grid_thw).tolist()))


def vision_layout(grid_thw, cfg: Qwen2_5_VLVisionConfig, windows: int | None = None) -> VisionLayout:
    """Window order, rotary positions and attention segments for the images of `grid_thw`.

    Mirrors transformers' `get_vision_window_index`, `get_vision_position_ids` and
    `get_vision_cu_seqlens`: merged tokens are grouped into windows of `window_merged`
    per side (edge windows smaller), concatenated window by window, image by image.
    Here every window gets `window_slots` slots (padding after its real patches), so
    windowed attention is one batched [W, S, S] attention; full-attention blocks attend
    within an image (one frame). `windows` (>= the real count) adds all-padding windows:
    a bucket, so images of different sizes share one compiled tower.
    """
    grid = check_grid(grid_thw, cfg)
    m, unit, win = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_merged
    slots = window_slots(cfg)
    real = num_patches(grid)
    needed = num_windows(grid, cfg)
    windows = needed if windows is None else int(windows)
    if windows < needed:
        raise ValueError(f"layout windows {windows} must be >= the {needed} windows of image_grid_thw")
    order = np.full((windows, slots), real, np.int64)  # `real` indexes the zero row appended to the patches
    positions = np.zeros((windows, slots, 2), np.int64)
    segment = np.full((windows, slots), -1, np.int64)
    merged_slot = np.zeros(real // unit, np.int64)  # merged token (input order) -> merged slot
    w_i = offset = frame = 0
    for t, h, w in grid.tolist():
        gh, gw = h // m, w // m
        # (h, w) of every patch, merge-block major: transformers' get_vision_position_ids.
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (gh, m, gw, m)
        hw = np.stack([a.reshape(block).transpose(0, 2, 1, 3).ravel() for a in (hpos, wpos)], -1)
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = (-gh) % win, (-gw) % win  # transformers pads a full window more; empty windows vanish
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        nh, nw = padded.shape[1] // win, padded.shape[2] // win
        tiles = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, -1, win * win)
        for f in range(t):
            for tile in tiles[f]:
                tokens = tile[tile >= 0]  # merged tokens of this window, in window order
                if not tokens.size:
                    continue
                rows = (tokens[:, None] * unit + np.arange(unit)).ravel()  # patch rows within the image
                n = rows.size
                order[w_i, :n] = rows + offset
                positions[w_i, :n] = hw[rows % (gh * gw * unit)]
                segment[w_i, :n] = frame + f
                merged_slot[offset // unit + tokens] = w_i * (slots // unit) + np.arange(tokens.size)
                w_i += 1
        offset += t * gh * gw * unit
        frame += t
    total_merged = windows * slots // unit
    used = np.zeros(total_merged, bool)
    used[merged_slot] = True
    inverse = np.concatenate([merged_slot, np.flatnonzero(~used)])
    return VisionLayout(
        order=order.ravel().astype(np.int32),
        positions=positions.reshape(-1, 2).astype(np.int32),
        valid=(order.ravel() < real),
        image_segment=segment.ravel().astype(np.int32),
        inverse=inverse.astype(np.int32),
    )


def image_token_counts(grid_thw: np.ndarray, cfg: Qwen2_5_VLVisionConfig) -> np.ndarray:
    """Merged (LLM) tokens per image: t * h * w / merge_unit."""
    return (np.prod(np.asarray(grid_thw), axis=-1) // cfg.merge_unit).astype(np.int64)


def image_spans(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per row, the [start, stop) runs of consecutive image tokens among the real tokens."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    spans = []
    for row, valid in zip(ids, mask):
        is_image = (row == image_token_id) & valid
        edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
        spans.append([(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])])
    return spans


def rope_index(
    input_ids, attention_mask, grid_thw, cfg: Qwen2_5_VLConfig
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions, transformers' `get_rope_index` for images.

    input_ids, attention_mask: [B, L] (left padding allowed); grid_thw: [n, 3], images
    in reading order across the batch (may be None for text only). Text tokens count on
    from the previous position; an image of grid (t, h, w) at start s gets t/h/w
    positions s + (t, h / m, w / m) indices and the text after it continues at
    s + max(h, w) / m. Padding gets 0.
    Returns (positions int32 [3, B, L], next position int32 [B] = max + 1 per row).
    """
    ids = np.asarray(input_ids)
    b, length = ids.shape
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    m = cfg.vision.spatial_merge_size
    grids = iter([] if grid_thw is None else np.asarray(grid_thw).tolist())
    out = np.zeros((3, b, length), np.int64)
    next_pos = np.zeros((b,), np.int64)
    for r in range(b):
        types = (ids[r][mask[r]] == cfg.image_token_id).astype(np.int8)
        pieces, pos = [], 0
        for kind, group in itertools.groupby(types.tolist()):
            n = len(list(group))
            if kind == 0:
                pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("input_ids holds more image-token spans than image_grid_thw has images") from None
            gt, gh, gw = t, h // m, w // m
            if n != gt * gh * gw:
                raise ValueError(
                    f"input_ids row {r}: an image-token span of {n} tokens does not match its grid "
                    f"({t}, {h}, {w}), which gives {gt * gh * gw} tokens"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)
            pos += max(h, w) // m
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        out[:, r, mask[r]] = row
        next_pos[r] = (row.max() + 1) if row.size else 0
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more images than input_ids has image-token spans")
    return out.astype(np.int32), next_pos.astype(np.int32)


class PreparedBatch(NamedTuple):
    input_ids: np.ndarray  # int32 [B, L] (spans padded to N slots when asked)
    attention_mask: np.ndarray  # int32 [B, L]: 0 on left padding and on added span slots
    pixel_values: np.ndarray | None  # f32 [P, C*T*p*p]: the patches, then zero rows up to the layout's P slots
    aux: QwenAux | None
    visual_counts: np.ndarray | None  # int [B]: real visual tokens per row when laid out for pruning, else None
    images_per_row: np.ndarray | None  # int [B]: images of each row when laid out for pruning, else None


def prepare_batch(
    cfg: "Qwen2_5_VLConfig",
    input_ids,
    attention_mask,
    pixel_values,
    image_grid_thw,
    *,
    visual_layout: bool = False,
    slot_multiple: int | None = None,
    windows: int | None = None,
    pad_id: int = 0,
    prompt_multiple: int | None = None,
) -> PreparedBatch:
    """Validate a Qwen2.5-VL batch and compute everything grid-dependent on the host.

    input_ids, attention_mask: [B, L] (left padding); pixel_values: [P, C*T*p*p], the
    processor's flattened patches of all images; image_grid_thw: [n, 3]. With
    `visual_layout` (pruning), `aux` carries the visual layout of models.protocol: each
    row's placeholders as merged-token indices, padded with masked slots to the row with
    the most, and each image's slots and grid; `slot_multiple` rounds the slot count and
    the image width up to a multiple of it, so images of different sizes give one shape. `windows` pads
    the tower to that many windows (a bucket); `prompt_multiple` left-pads the prompt
    to a multiple of it. Raises ValueError naming the argument.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    vc = cfg.vision
    image = ids == cfg.image_token_id
    if (ids == cfg.video_token_id).any():
        raise ValueError("input_ids holds video tokens: video input is not supported for Qwen2.5-VL (images only)")
    if pixel_values is None:
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw was given without pixel_values")
        if (image & (mask != 0)).any():
            raise ValueError("input_ids holds image tokens but pixel_values is None")
        if prompt_multiple:
            ids, mask = left_pad(ids, mask, prompt_multiple, pad_id)
        positions, next_pos = rope_index(ids, mask, None, cfg)
        aux = QwenAux(None, positions, next_pos, np.full(ids.shape, -1, np.int32), None, None)
        return PreparedBatch(ids.astype(np.int32), mask, None, aux, None, None)
    if image_grid_thw is None:
        raise ValueError(
            "image_grid_thw is required with pixel_values for Qwen2.5-VL: the processor returns it "
            "(int [num_images, 3] of t, h, w patches)"
        )
    grid = check_grid(image_grid_thw, vc)
    pixels = np.asarray(pixel_values)
    if pixels.ndim != 2 or pixels.shape[1] != vc.patch_dim:
        raise ValueError(
            f"pixel_values must be the processor's flattened patches [num_patches, {vc.patch_dim}] "
            f"(C*T*p*p = {vc.in_channels}*{vc.temporal_patch_size}*{vc.patch_size}*{vc.patch_size}), "
            f"got shape {pixels.shape}"
        )
    if pixels.shape[0] != num_patches(grid):
        raise ValueError(
            f"pixel_values holds {pixels.shape[0]} patch rows but image_grid_thw {grid.tolist()} "
            f"needs sum(t*h*w) = {num_patches(grid)}"
        )
    counts = image_token_counts(grid, vc)
    found = int((image & (mask != 0)).sum())
    if found != counts.sum():
        raise ValueError(
            f"input_ids holds {found} image tokens (id {cfg.image_token_id}) but image_grid_thw gives "
            f"{counts.tolist()} = {int(counts.sum())} merged tokens"
        )
    visual_counts = images_per_row = image_index = None
    if visual_layout:
        per_row = [len(row) for row in image_spans(ids, mask, cfg.image_token_id)]
        if sum(per_row) != len(grid):
            raise ValueError(
                f"input_ids holds {sum(per_row)} image-token spans (per row {per_row}) but image_grid_thw has "
                f"{len(grid)} images"
            )
        starts = np.cumsum([0] + per_row)
        tokens = [counts[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
        if not all(tokens):
            raise ValueError(f"pruning needs at least one image in every prompt: image spans per row {per_row}")
        images_per_row = np.asarray(per_row)
        visual_counts = np.asarray([sum(t) for t in tokens])
        slots, width = int(visual_counts.max()), None
        if slot_multiple:
            slots, width = round_up(slots, slot_multiple), round_up(int(counts.max()), slot_multiple)
        if slots > visual_counts.min():
            ids, mask = pad_visual_slots(ids, mask, cfg.image_token_id, slots, pad_id)
        image_index = image_slot_index(tokens, width)
    if prompt_multiple:
        ids, mask = left_pad(ids, mask, prompt_multiple, pad_id)
    positions, next_pos = rope_index(ids, mask, grid, cfg)  # also checks each span against its grid
    real_image = (ids == cfg.image_token_id) & (mask != 0)
    feature_index = np.full(ids.shape, -1, np.int64)
    feature_index[real_image] = np.arange(int(real_image.sum()))  # reading order = merged-token order
    visual_index = visual_valid = image_grid = None
    if visual_layout:
        slots_mask = ids == cfg.image_token_id
        visual_index = feature_index[slots_mask].reshape(ids.shape[0], -1)
        visual_valid = visual_index >= 0
        visual_index = np.maximum(visual_index, 0).astype(np.int32)
        if (grid[:, 0] == 1).all():  # one frame each: every image is an (h, w) grid, row-major
            image_grid = np.zeros(image_index.shape[:2] + (2,), np.int32)
            image_grid[image_index[:, :, 0] >= 0] = grid[:, 1:] // vc.spatial_merge_size
    layout = vision_layout(grid, vc, windows=None if windows is None else max(int(windows), num_windows(grid, vc)))
    aux = QwenAux(layout, positions, next_pos, feature_index.astype(np.int32), visual_index, visual_valid, image_index,
                  image_grid)
    # Zero rows up to the slot count: the tower's input shape then follows the bucket only.
    pixels = np.pad(pixels.astype(np.float32), ((0, layout.order.size - pixels.shape[0]), (0, 0)))
    return PreparedBatch(ids.astype(np.int32), mask, pixels, aux, visual_counts, images_per_row)
