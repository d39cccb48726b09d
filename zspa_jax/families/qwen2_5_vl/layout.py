"""Qwen2.5-VL's host-side layout: everything that depends on the grids, in numpy.

Window order and its inverse, the tower's 2-D rotary positions and attention segments
(`vision_layout`), the LLM's 3-D M-RoPE positions as transformers' `get_rope_index`
(`rope_index`), and the whole checked batch (`check_items`, then `lay_out` once the shared
host rules (zspa_jax.host) have padded the ids), so that the jitted programs only see
arrays of static shape (`models.qwen2_5_vl.VisionLayout`, `QwenAux`).

Images and videos go through the same tower: a batch's visual *items* are its images
(`pixel_values`, `image_grid_thw`) and videos (`pixel_values_videos`, `video_grid_thw`)
in reading order (row by row, span by span), their patches concatenated into one patch
array and one `VisionLayout`, so every placeholder, image or video, reads its merged token
from one feature array (`QwenAux.feature_index`).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from models import qwen2_5_vl as qwen_model
from models.qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLVisionConfig,
    QwenAux,
    VisionLayout,
    window_slots,
)
from zspa_jax.host import round_up

__all__ = [
    "IMAGE",
    "VIDEO",
    "Items",
    "PreparedBatch",
    "SLOT_LADDER_START",
    "SLOT_MANTISSAS",
    "SLOT_RATIO",
    "check_grid",
    "check_items",
    "image_slot_index",
    "image_spans",
    "image_token_counts",
    "lay_out",
    "num_patches",
    "num_windows",
    "prepare_batch",
    "rope_index",
    "slot_bucket",
    "temporal_bucket",
    "token_bucket",
    "vision_layout",
    "visual_spans",
    "windows_per_frame",
]

IMAGE, VIDEO = 1, 2  # transformers' mm_token_type_ids values (0 = text)
KIND = {
    IMAGE: ("image", "pixel_values", "image_grid_thw"),
    VIDEO: ("video", "pixel_values_videos", "video_grid_thw"),
}
# With `bucket`, the tower's slots follow a ladder in merged tokens: powers of two up to
# SLOT_LADDER_START (64 merged tokens = 256 patches, a 224 x 224 image), then in each octave
# [2^k, 2^(k+1)] the rungs 2^k * m / 32 for m in SLOT_MANTISSAS, each at most SLOT_RATIO
# times the one before: an image of >= 256 patches is padded by less than 10% of its
# patches. Powers of two (224^2, 448^2, 896^2 images) and 1.25 * 2^k (1280 merged tokens,
# the default processor's largest image) are rungs.
SLOT_LADDER_START = 64
SLOT_RATIO = 1.1
SLOT_MANTISSAS = (32, 35, 38, 40, 44, 48, 52, 56, 60)


def check_grid(grid_thw, cfg: Qwen2_5_VLVisionConfig, name: str = "image_grid_thw") -> np.ndarray:
    """int64 [n, 3] with every row a valid (t, h, w) grid, else ValueError naming `name`.
    t counts temporal patches (1 for an image; frames / temporal_patch_size for a video)."""
    grid = np.asarray(grid_thw)
    what = "videos" if name.startswith("video") else "images"
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(
            f"{name} must be an integer array [num_{what}, 3] of (t, h, w), got shape {grid.shape}"
        )
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer array [num_{what}, 3] of (t, h, w), got dtype {grid.dtype}"
        )
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1:
            raise ValueError(f"{name}[{i}] = ({t}, {h}, {w}): t must be >= 1 (temporal patches)")
        if h < m or w < m or h % m or w % m:
            raise ValueError(
                f"{name}[{i}] = ({t}, {h}, {w}): h and w must be positive multiples of spatial_merge_size={m} "
                f"(the {what[:-1]} is too small for one merged token, or not from the Qwen2-VL processor)"
            )
    return grid.astype(np.int64)


def num_patches(grid_thw: np.ndarray) -> int:
    return int(np.prod(np.asarray(grid_thw), axis=-1).sum())


def num_windows(grid_thw, cfg: Qwen2_5_VLVisionConfig) -> int:
    """Non-empty windows of all items, every temporal patch its own windows (what the
    tower's slot count is made of)."""
    win, m = cfg.window_merged, cfg.spatial_merge_size
    return int(
        sum(
            t * -(-(h // m) // win) * -(-(w // m) // win)
            for t, h, w in np.asarray(grid_thw).tolist()
        )
    )


def windows_per_frame(grid_thw, cfg: Qwen2_5_VLVisionConfig) -> np.ndarray:
    """int [n]: windows of one temporal patch of each item (a full-attention segment's windows)."""
    win, m = cfg.window_merged, cfg.spatial_merge_size
    return np.array(
        [-(-(h // m) // win) * -(-(w // m) // win) for _, h, w in np.asarray(grid_thw).tolist()],
        np.int64,
    )


def temporal_bucket(t: int) -> int:
    """The temporal patch count a video of `t` is padded to in shapes: the next power of two."""
    return 1 << max(int(t) - 1, 0).bit_length()


def token_bucket(n: int) -> int:
    """The count `n` merged tokens are padded to in the tower: the next power of two up to
    SLOT_LADDER_START, then the next rung of the ladder (consecutive rungs at most
    SLOT_RATIO apart, so the padding is < (SLOT_RATIO - 1) * n there)."""
    n = max(int(n), 1)
    if n <= SLOT_LADDER_START:
        return 1 << (n - 1).bit_length()
    octave = 1 << (n.bit_length() - 1)  # 2^k <= n < 2^(k+1)
    step = octave // 32
    return next((m * step for m in SLOT_MANTISSAS if m * step >= n), 2 * octave)


def slot_bucket(patches: int, cfg: Qwen2_5_VLVisionConfig) -> int:
    """The tower's slot count for `patches` real patches (a multiple of merge_unit):
    merge_unit * token_bucket(patches / merge_unit)."""
    return cfg.merge_unit * token_bucket(-(-int(patches) // cfg.merge_unit))


def vision_layout(
    grid_thw,
    cfg: Qwen2_5_VLVisionConfig,
    slots: int | None = None,
    segment_slots: int | None = None,
) -> VisionLayout:
    """Window order, rotary positions and attention segments for the items of `grid_thw`.

    Mirrors transformers' `get_vision_window_index`, `get_vision_position_ids` and
    `get_vision_cu_seqlens` (vision_utils.py): merged tokens are grouped into windows of
    `window_merged` per side (edge windows smaller), every temporal patch of an item on its
    own (its windows, then the next temporal patch's), concatenated window by window, item
    by item; the 2-D rotary positions repeat for every temporal patch; full-attention blocks
    attend within one temporal patch of one item (transformers' cu_seqlens: h*w per frame,
    t segments per item). The real patches fill the first slots densely in that order, as
    transformers concatenates them; `slots` (>= the real count, a multiple of merge_unit)
    adds padding slots after them: a bucket, so items of different sizes share one
    compiled tower. Both attentions score queries in chunks, each against the key slots
    that hold its queries' segments only (`window_keys` / `window_offsets` for windows:
    chunks of at most one full window, span chunk + 2 * (window slots - 1); `chunk_keys` /
    `key_offsets` for full attention: chunks of at most `QUERY_CHUNK`, span chunk + 2 *
    (the largest segment's patches - 1), the largest counted as `segment_slots` when given,
    a bucket >= the real count, so the span too follows buckets only); spans are capped at
    all slots.
    """
    grid = check_grid(grid_thw, cfg, "grid_thw")
    m, unit, win = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_merged
    real = num_patches(grid)
    slots = real if slots is None else int(slots)
    if slots < real or slots % unit:
        raise ValueError(
            f"layout slots {slots} must be a multiple of merge_unit={unit} and >= the {real} patches of the grids"
        )
    order = np.full(slots, real, np.int64)  # `real` indexes the zero row appended to the patches
    positions = np.zeros((slots, 2), np.int64)
    segment = np.full(slots, -1, np.int64)
    window = np.full(slots, -1, np.int64)
    merged_slot = np.zeros(real // unit, np.int64)  # merged token (input order) -> merged slot
    w_i = offset = frame = at = 0
    for t, h, w in grid.tolist():
        gh, gw = h // m, w // m
        # (h, w) of every patch, merge-block major: transformers' get_vision_position_ids.
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (gh, m, gw, m)
        hw = np.stack([a.reshape(block).transpose(0, 2, 1, 3).ravel() for a in (hpos, wpos)], -1)
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = (
            (-gh) % win,
            (-gw) % win,
        )  # transformers pads a full window more; empty windows vanish
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        nh, nw = padded.shape[1] // win, padded.shape[2] // win
        tiles = (
            padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, -1, win * win)
        )
        for f in range(t):
            for tile in tiles[f]:
                tokens = tile[tile >= 0]  # merged tokens of this window, in window order
                if not tokens.size:
                    continue
                rows = (
                    tokens[:, None] * unit + np.arange(unit)
                ).ravel()  # patch rows within the item
                n = rows.size
                order[at : at + n] = rows + offset
                positions[at : at + n] = hw[rows % (gh * gw * unit)]
                segment[at : at + n] = frame + f
                window[at : at + n] = w_i
                merged_slot[offset // unit + tokens] = at // unit + np.arange(tokens.size)
                at += n
                w_i += 1
        offset += t * gh * gw * unit
        frame += t
    # every merged slot below real // unit holds a real token; the padding's follow
    inverse = np.concatenate([merged_slot, np.arange(real // unit, slots // unit)])
    largest = int(max(h * w for _, h, w in grid.tolist())) if len(grid) else 1
    if segment_slots is not None:
        if segment_slots < largest:
            raise ValueError(
                f"segment_slots {segment_slots} must be >= the largest segment's {largest} patches"
            )
        largest = int(segment_slots)
    chunk_keys, key_offsets = _key_ranges(segment, qwen_model.QUERY_CHUNK, largest)
    window_keys, window_offsets = _key_ranges(window, window_slots(cfg), window_slots(cfg))
    return VisionLayout(
        order=order.astype(np.int32),
        positions=positions.astype(np.int32),
        valid=order < real,
        image_segment=segment.astype(np.int32),
        inverse=inverse.astype(np.int32),
        window_segment=window.astype(np.int32),
        chunk_keys=chunk_keys,
        key_offsets=key_offsets,
        window_keys=window_keys,
        window_offsets=window_offsets,
    )


def _key_ranges(segment: np.ndarray, max_chunk: int, largest: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys int32 [C], offsets int32 [span]): the P slots scored in C = ceil(P / max_chunk)
    query chunks of ceil(P / C) slots (the model pads P to C chunks), and for each chunk the
    first of `span` consecutive key slots covering every segment its queries belong to.
    Segments are runs of consecutive slots of at most `largest` slots."""
    p = segment.size
    chunks = -(-p // max_chunk)
    chunk = qwen_model.chunk_size(p, chunks)
    padded = chunks * chunk
    span = min(padded, chunk + 2 * (largest - 1))
    segment = np.pad(segment, (0, padded - p), constant_values=-1)
    real = segment >= 0
    slot = np.arange(padded)
    count = int(segment.max()) + 1 if real.any() else 0
    first = np.full(count, padded, np.int64)
    last = np.zeros(count, np.int64)
    np.minimum.at(first, segment[real], slot[real])
    np.maximum.at(last, segment[real], slot[real] + 1)
    starts = []
    for c in range(chunks):
        segs = segment[c * chunk : (c + 1) * chunk]
        segs = segs[segs >= 0]
        lo, hi = (first[segs.min()], last[segs.max()]) if segs.size else (c * chunk, c * chunk)
        if (
            hi - lo > span
        ):  # cannot happen: segments are consecutive and at most `largest` slots long
            raise AssertionError(f"chunk {c} needs keys [{lo}, {hi}) beyond the span {span}")
        starts.append(min(lo, padded - span))
    return np.asarray(starts, np.int32), np.arange(span, dtype=np.int32)


def image_token_counts(grid_thw: np.ndarray, cfg: Qwen2_5_VLVisionConfig) -> np.ndarray:
    """Merged (LLM) tokens per image or video: t * h * w / merge_unit."""
    return (np.prod(np.asarray(grid_thw), axis=-1) // cfg.merge_unit).astype(np.int64)


def _token_types(ids: np.ndarray, cfg: Qwen2_5_VLConfig) -> np.ndarray:
    """transformers' mm_token_type_ids: 1 on image tokens, 2 on video tokens, 0 elsewhere."""
    return np.where(
        ids == cfg.image_token_id, IMAGE, np.where(ids == cfg.video_token_id, VIDEO, 0)
    ).astype(np.int8)


def visual_spans(
    input_ids, attention_mask, cfg: Qwen2_5_VLConfig
) -> list[list[tuple[int, int, int]]]:
    """Per row, the (kind, start, stop) runs of consecutive image (kind 1) or video (kind 2)
    tokens among the real tokens, in reading order."""
    ids = np.asarray(input_ids)
    mask = (
        np.ones(ids.shape, bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    types = _token_types(ids, cfg) * mask
    spans = []
    for row in types:
        out, start = [], 0
        for kind, group in itertools.groupby(row.tolist()):
            n = len(list(group))
            if kind:
                out.append((int(kind), start, start + n))
            start += n
        spans.append(out)
    return spans


def image_spans(
    input_ids: np.ndarray, attention_mask: np.ndarray | None, image_token_id: int
) -> list[list[tuple[int, int]]]:
    """Per row, the [start, stop) runs of consecutive image tokens among the real tokens."""
    ids = np.asarray(input_ids)
    mask = (
        np.ones(ids.shape, bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    spans = []
    for row, valid in zip(ids, mask):
        is_image = (row == image_token_id) & valid
        edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
        spans.append([(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])])
    return spans


def _temporal_positions(t: int, tokens_per_second: int, seconds) -> np.ndarray:
    """transformers' `get_vision_position_ids` temporal index of a video's t patches before
    the offset: `(arange(t) * time_interval).long()`, time_interval = tokens_per_second *
    second_per_grid_ts. `seconds` None (transformers' default, one second per temporal patch)
    or an integer gives exact integers; a float is a float32 tensor element in transformers
    (what its processor returns), so the product is rounded to float32 and truncated, as
    torch does."""
    if seconds is None or isinstance(seconds, (int, np.integer)):
        return (
            np.arange(t, dtype=np.int64)
            * tokens_per_second
            * (1 if seconds is None else int(seconds))
        )
    interval = np.float32(np.float32(tokens_per_second) * np.float32(seconds))
    return (np.arange(t, dtype=np.float32) * interval).astype(np.int64)


def _seconds_list(second_per_grid_ts, videos: int) -> list | None:
    """second_per_grid_ts as one entry per video (ints stay ints, floats become float32), or None."""
    if second_per_grid_ts is None:
        return None
    s = np.asarray(second_per_grid_ts)
    if s.ndim != 1 or s.shape[0] != videos:
        raise ValueError(
            f"second_per_grid_ts must hold one entry per video of video_grid_thw ({videos}), got shape {s.shape}"
        )
    if np.issubdtype(s.dtype, np.integer):
        if (s < 0).any():
            raise ValueError(
                f"second_per_grid_ts must be >= 0 (seconds per temporal patch), got {s.tolist()}"
            )
        return [int(v) for v in s]
    if not np.issubdtype(s.dtype, np.floating):
        raise ValueError(
            f"second_per_grid_ts must be a numeric array [num_videos], got dtype {s.dtype}"
        )
    s = s.astype(np.float32)
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(
            f"second_per_grid_ts must be finite and >= 0 (seconds per temporal patch), got {s.tolist()}"
        )
    return [np.float32(v) for v in s]


def rope_index(
    input_ids,
    attention_mask,
    grid_thw,
    cfg: Qwen2_5_VLConfig,
    video_grid_thw=None,
    second_per_grid_ts=None,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions, exactly transformers' `get_rope_index` (modeling_qwen2_5_vl.py).

    input_ids, attention_mask: [B, L] (left padding allowed); grid_thw: the images' grids
    [n, 3] in reading order across the batch (None: no images); video_grid_thw: the videos'
    [v, 3] (None: no videos); second_per_grid_ts: [v] seconds per temporal patch of each
    video (None: transformers' default, 1 second). Text tokens count on from the previous
    position; an item of grid (t, h, w) starting at s gets h/w positions s + (h / m, w / m)
    indices and temporal positions s + trunc(i * tokens_per_second * second_per_grid_ts)
    for a video (s + i for an image), and the text after it continues at s + max(h, w) / m
    (not at the item's largest position + 1: a video's temporal positions may run past
    it). Padding gets 0. Returns (positions int32 [3, B, L], next position int32 [B] = the
    row's largest position + 1, where transformers' rope_deltas continue decoding).
    """
    ids = np.asarray(input_ids)
    b, length = ids.shape
    mask = (
        np.ones(ids.shape, bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    m = cfg.vision.spatial_merge_size
    tps = cfg.vision.tokens_per_second
    grids = {
        IMAGE: iter([] if grid_thw is None else np.asarray(grid_thw).tolist()),
        VIDEO: iter([] if video_grid_thw is None else np.asarray(video_grid_thw).tolist()),
    }
    n_videos = 0 if video_grid_thw is None else len(np.asarray(video_grid_thw))
    seconds = iter(_seconds_list(second_per_grid_ts, n_videos) or [None] * n_videos)
    types_all = _token_types(ids, cfg)
    out = np.zeros((3, b, length), np.int64)
    next_pos = np.zeros((b,), np.int64)
    for r in range(b):
        types = types_all[r][mask[r]]
        pieces, pos = [], 0
        for kind, group in itertools.groupby(types.tolist()):
            n = len(list(group))
            if kind == 0:
                pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
                continue
            what, _, name = KIND[kind]
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(
                    f"input_ids holds more {what}-token spans than {name} has {what}s"
                ) from None
            gt, gh, gw = t, h // m, w // m
            if n != gt * gh * gw:
                raise ValueError(
                    f"input_ids row {r}: {'an' if what == 'image' else 'a'} {what}-token span of {n} tokens does not "
                    f"match its grid ({t}, {h}, {w}) in {name}, which gives {gt * gh * gw} tokens"
                )
            temporal = (
                np.arange(gt) if kind == IMAGE else _temporal_positions(gt, tps, next(seconds))
            )
            tt, hh, ww = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)
            pos += max(h, w) // m
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        out[:, r, mask[r]] = row
        next_pos[r] = (row.max() + 1) if row.size else 0
    for kind, (what, _, name) in KIND.items():
        if next(grids[kind], None) is not None:
            raise ValueError(f"{name} has more {what}s than input_ids has {what}-token spans")
    return out.astype(np.int32), next_pos.astype(np.int32)


class Items(NamedTuple):
    """A batch's checked visual items (images and videos) in reading order (`check_items`)."""

    grid: np.ndarray  # int64 [n, 3]: each item's (t, h, w)
    pixels: np.ndarray  # f32 [sum t*h*w, C*T*p*p]: the items' patches, concatenated
    tokens: np.ndarray  # int64 [n]: merged tokens of each item
    shaped_tokens: np.ndarray  # int64 [n]: the slots its shapes take (temporal buckets)
    per_row: list[int]  # items of each row
    image_grid: np.ndarray | None  # int64 [images, 3]: what rope_index reads
    video_grid: np.ndarray | None  # int64 [videos, 3]
    seconds: list | None  # second_per_grid_ts, one entry per video

    def by_row(self, counts: np.ndarray) -> list[list[int]]:
        """`counts` [n] split into each row's items."""
        starts = np.cumsum([0] + self.per_row)
        return [counts[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


class PreparedBatch(NamedTuple):
    input_ids: np.ndarray  # int32 [B, L]
    attention_mask: np.ndarray  # int32 [B, L]: 0 on left padding (and on added span slots)
    pixel_values: np.ndarray | None  # f32 [P, C*T*p*p]: the items' patches, then zero rows
    aux: QwenAux


def _checked_visual(kind: int, pixel_values, grid_thw, vc: Qwen2_5_VLVisionConfig):
    """(patches f32 [P, D], grid int64 [n, 3]) of one kind, checked against each other, or None."""
    what, pixels_name, grid_name = KIND[kind]
    if pixel_values is None:
        if grid_thw is not None:
            raise ValueError(f"{grid_name} was given without {pixels_name}")
        return None
    if grid_thw is None:
        extra = "the processor returns it " if kind == IMAGE else "the video processor returns it "
        raise ValueError(
            f"{grid_name} is required with {pixels_name} for Qwen2.5-VL: {extra}(int [num_{what}s, 3] of t, h, w patches)"
        )
    grid = check_grid(grid_thw, vc, grid_name)
    pixels = np.asarray(pixel_values)
    if pixels.ndim != 2 or pixels.shape[1] != vc.patch_dim:
        raise ValueError(
            f"{pixels_name} must be the processor's flattened patches [num_patches, {vc.patch_dim}] "
            f"(C*T*p*p = {vc.in_channels}*{vc.temporal_patch_size}*{vc.patch_size}*{vc.patch_size}), "
            f"got shape {pixels.shape}"
        )
    if pixels.shape[0] != num_patches(grid):
        raise ValueError(
            f"{pixels_name} holds {pixels.shape[0]} patch rows but {grid_name} {grid.tolist()} "
            f"needs sum(t*h*w) = {num_patches(grid)}"
        )
    return pixels, grid


def check_items(
    cfg: Qwen2_5_VLConfig,
    ids: np.ndarray,
    mask: np.ndarray,
    pixel_values,
    image_grid_thw,
    *,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    bucket: bool = False,
) -> Items | None:
    """Check a Qwen2.5-VL batch's visual arrays against each other and against the
    placeholders of `ids` [B, L] (`mask`: 0 on left padding); None without any.

    pixel_values: [P, C*T*p*p], the image processor's flattened patches of all images,
    image_grid_thw: [n, 3]; pixel_values_videos / video_grid_thw: the same for videos (t =
    frames / temporal_patch_size); second_per_grid_ts: [v] seconds per temporal patch (None:
    transformers' default of 1). A row may hold images and videos, in any order. `bucket`:
    every video's temporal patches count as `temporal_bucket(t)` in the shapes
    (`Items.shaped_tokens`), so clips of different lengths in one bucket share compiled
    programs. Raises ValueError naming the argument.
    """
    vc = cfg.vision
    real = mask != 0
    visual = {
        IMAGE: _checked_visual(IMAGE, pixel_values, image_grid_thw, vc),
        VIDEO: _checked_visual(VIDEO, pixel_values_videos, video_grid_thw, vc),
    }
    if second_per_grid_ts is not None and visual[VIDEO] is None:
        raise ValueError("second_per_grid_ts was given without pixel_values_videos")
    for kind, token in zip((IMAGE, VIDEO), (cfg.image_token_id, cfg.video_token_id)):
        what, pixels_name, grid_name = KIND[kind]
        found = int(((ids == token) & real).sum())
        if visual[kind] is None:
            if found:
                raise ValueError(
                    f"input_ids holds {what} tokens (id {token}) but {pixels_name} is None"
                )
            continue
        counts = image_token_counts(visual[kind][1], vc)
        if found != counts.sum():
            raise ValueError(
                f"input_ids holds {found} {what} tokens (id {token}) but {grid_name} gives "
                f"{counts.tolist()} = {int(counts.sum())} merged tokens"
            )
    image_grid = None if visual[IMAGE] is None else visual[IMAGE][1]
    video_grid = None if visual[VIDEO] is None else visual[VIDEO][1]
    if image_grid is None and video_grid is None:
        return None
    seconds = None if video_grid is None else _seconds_list(second_per_grid_ts, len(video_grid))

    # The items (images and videos) in reading order, each kind taking its grids in order.
    spans = visual_spans(ids, mask, cfg)
    for kind, grid in ((IMAGE, image_grid), (VIDEO, video_grid)):
        what, _, grid_name = KIND[kind]
        per_row = [sum(k == kind for k, _, _ in row) for row in spans]
        have = 0 if grid is None else len(grid)
        if sum(per_row) != have:
            raise ValueError(
                f"input_ids holds {sum(per_row)} {what}-token spans (per row {per_row}) but {grid_name} has "
                f"{have} {what}s"
            )
    offsets = {
        kind: np.cumsum([0] + [int(np.prod(g)) for g in v[1]])
        for kind, v in visual.items()
        if v is not None
    }
    taken = {IMAGE: 0, VIDEO: 0}
    items = []  # (kind, index within its kind), reading order over the batch
    for row in spans:
        for kind, _, _ in row:
            items.append((kind, taken[kind]))
            taken[kind] += 1
    item_grid = np.stack([visual[k][1][i] for k, i in items]).astype(np.int64)
    item_pixels = np.concatenate(
        [visual[k][0][offsets[k][i] : offsets[k][i + 1]] for k, i in items]
    ).astype(np.float32)
    is_video = np.array([k == VIDEO for k, _ in items])
    shaped_grid = item_grid.copy()  # the grids the shapes follow (temporal buckets for videos)
    if bucket:
        shaped_grid[is_video, 0] = [temporal_bucket(t) for t in item_grid[is_video, 0]]
    return Items(
        item_grid,
        item_pixels,
        image_token_counts(item_grid, vc),
        image_token_counts(shaped_grid, vc),
        [len(row) for row in spans],
        image_grid,
        video_grid,
        seconds,
    )


def lay_out(
    cfg: Qwen2_5_VLConfig,
    items: Items | None,
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    visual_layout: bool = False,
    slot_multiple: int | None = None,
    bucket: bool = False,
) -> tuple[np.ndarray | None, QwenAux]:
    """Everything grid-dependent for the final ids [B, L] (placeholders already padded to
    each row's slots under pruning; left padding allowed): (patches f32 [P, C*T*p*p] or
    None, `QwenAux`).

    With `visual_layout` (pruning), `aux` carries the visual layout of models.protocol: each
    row's placeholders (image and video tokens) as merged-token indices and each item's
    slots (one entry per image or video) and, when every item is a single frame (t = 1),
    its (h, w) grid; `slot_multiple` rounds the item width up to a multiple of it. `bucket`:
    the tower's patch slots padded to `slot_bucket` (and the largest full-attention segment
    to the same ladder), so items of different sizes share a compiled tower.
    """
    if items is None:
        positions, next_pos = rope_index(ids, mask, None, cfg)
        return None, QwenAux(
            None, positions, next_pos, np.full(ids.shape, -1, np.int32), None, None
        )
    vc = cfg.vision
    token_ids = (cfg.image_token_id, cfg.video_token_id)
    # also checks each span against its grid
    positions, next_pos = rope_index(
        ids, mask, items.image_grid, cfg, items.video_grid, items.seconds
    )
    placeholder = np.isin(ids, token_ids)
    real_visual = placeholder & (mask != 0)
    feature_index = np.full(ids.shape, -1, np.int64)
    # reading order = item order = merged-token order
    feature_index[real_visual] = np.arange(int(real_visual.sum()))
    visual_index = visual_valid = image_index = grid_hw = None
    if visual_layout:
        width = None
        if slot_multiple:
            width = round_up(int(items.shaped_tokens.max()), slot_multiple)
        image_index = image_slot_index(items.by_row(items.tokens), width)
        visual_index = feature_index[placeholder].reshape(ids.shape[0], -1)
        visual_valid = visual_index >= 0
        visual_index = np.maximum(visual_index, 0).astype(np.int32)
        if (items.grid[:, 0] == 1).all():  # one frame each: every item is an (h, w) grid, row-major
            grid_hw = np.zeros(image_index.shape[:2] + (2,), np.int32)
            grid_hw[image_index[:, :, 0] >= 0] = items.grid[:, 1:] // vc.spatial_merge_size
    slots = segment_slots = None
    if bucket:
        shaped_patches = int((items.shaped_tokens * vc.merge_unit).sum())
        slots = slot_bucket(shaped_patches, vc)
        largest = int((items.grid[:, 1] * items.grid[:, 2]).max())
        segment_slots = min(slots, slot_bucket(largest, vc))
    layout = vision_layout(items.grid, vc, slots=slots, segment_slots=segment_slots)
    aux = QwenAux(
        layout,
        positions,
        next_pos,
        feature_index.astype(np.int32),
        visual_index,
        visual_valid,
        image_index,
        grid_hw,
    )
    # Zero rows up to the slot count: the tower's input shape then follows the bucket only.
    pixels = np.pad(items.pixels, ((0, layout.order.size - items.pixels.shape[0]), (0, 0)))
    return pixels, aux


def prepare_batch(
    cfg: Qwen2_5_VLConfig,
    input_ids,
    attention_mask,
    pixel_values,
    image_grid_thw,
    *,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    bucket: bool = False,
) -> PreparedBatch:
    """`check_items` then `lay_out` of an unpruned batch as given (no slot or prompt
    padding: the shared host rules, zspa_jax.host, add those for forward and generate)."""
    ids = np.asarray(input_ids)
    mask = (
        np.ones(ids.shape, np.int32)
        if attention_mask is None
        else np.asarray(attention_mask).astype(np.int32)
    )
    items = check_items(
        cfg,
        ids,
        mask,
        pixel_values,
        image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        bucket=bucket,
    )
    pixels, aux = lay_out(cfg, items, ids, mask, bucket=bucket)
    return PreparedBatch(ids.astype(np.int32), mask, pixels, aux)


def image_slot_index(tokens_per_image: list[list[int]], width: int | None = None) -> np.ndarray:
    """int32 [B, I, n]: for row b's image i, the slots [start, start + count) it holds among
    the row's placeholders (images follow each other in reading order); -1 pads images to
    n = max(count, width) and rows to I = the most images in a row."""
    images = max(len(r) for r in tokens_per_image)
    n = max([c for r in tokens_per_image for c in r] + [width or 0, 1])
    index = np.full((len(tokens_per_image), images, n), -1, np.int32)
    for b, counts in enumerate(tokens_per_image):
        start = 0
        for i, count in enumerate(counts):
            index[b, i, :count] = np.arange(start, start + count)
            start += count
    return index
