"""LLaVA-NeXT's anyres geometry on the host, in numpy: which pinpoint an image is resized
into, how many crops and placeholders it takes, and the `AnyresLayout` (the aux pytree of
`models.llava_next`) that says where each packed visual token comes from.

The layout is computed here from the host's image sizes, so the jitted part
(`LlavaNextForConditionalGeneration.packed_features`) is one gather over static-shaped
arrays: images of different sizes share one compiled function.

Reference: transformers' models/llava_next (modeling, processing, image processing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from models.llava_next import NEWLINE, AnyresLayout, LlavaNextConfig

__all__ = [
    "Unpadded",
    "anyres_grid_shape",
    "anyres_layout",
    "check_image_sizes",
    "check_inputs",
    "image_num_patches",
    "image_token_count",
    "select_best_resolution",
    "unpadded_features_shape",
]


def _image_size(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    """(height, width) as positive Python ints (a list, tuple or numpy / torch row)."""
    values = np.asarray(image_size).reshape(-1)
    if values.shape != (2,) or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be an image's (height, width), got {image_size!r}")
    if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
        raise ValueError(f"{name} must hold whole pixel counts, got {image_size!r}")
    h, w = (int(v) for v in values)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive (height, width), got ({h}, {w})")
    return h, w


def select_best_resolution(
    image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The pinpoint (height, width) an image of `image_size` (height, width) is resized into:
    the most of the image's own pixels kept, then the least padding (transformers'
    `image_processing_utils.select_best_resolution`, ties to the first)."""
    height, width = _image_size(image_size)
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    if best is None:
        raise ValueError(
            f"no pinpoint fits image_size {image_size!r} (pinpoints {list(pinpoints)!r})"
        )
    return best


def anyres_grid_shape(
    image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """(rows, cols) of crops for an image of `image_size` (height, width). `patch_size` is
    the crop side in pixels, i.e. the tower's image_size (transformers'
    `get_anyres_image_grid_shape` names it so)."""
    h, w = select_best_resolution(image_size, pinpoints)
    return h // patch_size, w // patch_size


class Unpadded(NamedTuple):
    """The part of an image's [rows * side, cols * side] crop-feature map that covers the
    image (not the letterbox padding): `rows` x `cols` tokens from (`top`, `left`)."""

    rows: int
    cols: int
    top: int
    left: int


def unpadded_features_shape(
    image_size: Sequence[int], grid_shape: Sequence[int], tokens_per_side: int
) -> Unpadded:
    """What transformers' `unpad_image` keeps of the crop-feature map of an image of
    `image_size` (height, width) cut into `grid_shape` (rows, cols) crops of
    `tokens_per_side`^2 tokens (same float arithmetic, so the same rounding)."""
    height, width = _image_size(image_size)
    current_height, current_width = grid_shape[0] * tokens_per_side, grid_shape[1] * tokens_per_side
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        padding = (current_height - new_height) // 2
        return Unpadded(current_height - 2 * padding, current_width, padding, 0)
    new_width = int(round(width * (current_height / height), 7))
    padding = (current_width - new_width) // 2
    return Unpadded(current_height, current_width - 2 * padding, 0, padding)


def image_num_patches(image_size: Sequence[int], cfg: LlavaNextConfig) -> int:
    """Crops the processor makes for an image, base view included (pixel_values rows it uses)."""
    rows, cols = anyres_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.crop_size)
    return 1 + rows * cols


def image_token_count(image_size: Sequence[int], cfg: LlavaNextConfig) -> int:
    """Placeholders an image of `image_size` (height, width) takes in input_ids: the base
    view's P tokens, then the unpadded crop grid with one newline per row (what
    transformers' LlavaNextProcessor writes and `get_image_features` returns)."""
    grid = anyres_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.crop_size)
    kept = unpadded_features_shape(image_size, grid, cfg.tokens_per_side)
    return cfg.tokens_per_crop + kept.rows * (kept.cols + 1)


def _image_index(image_size: tuple[int, int], cfg: LlavaNextConfig) -> np.ndarray:
    """int32 [n]: tower-token index (crop * P + token) of each packed slot, NEWLINE for newlines."""
    side, tokens = cfg.tokens_per_side, cfg.tokens_per_crop
    rows, cols = anyres_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.crop_size)
    kept = unpadded_features_shape(image_size, (rows, cols), side)
    r = np.arange(kept.top, kept.top + kept.rows)[
        :, None
    ]  # rows of the [rows * side, cols * side] map
    c = np.arange(kept.left, kept.left + kept.cols)[None, :]
    crop = 1 + (r // side) * cols + (c // side)  # crop 0 is the base view
    grid = crop * tokens + (r % side) * side + (c % side)
    grid = np.concatenate(
        [grid, np.full((kept.rows, 1), NEWLINE)], axis=1
    )  # a newline ends every row
    return np.concatenate([np.arange(tokens), grid.reshape(-1)]).astype(np.int32)


def check_image_sizes(image_sizes: Any) -> np.ndarray:
    """int64 [num_images, 2] of positive (height, width); ValueError naming image_sizes."""
    sizes = np.asarray(image_sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.number):
        raise ValueError(
            f"image_sizes must be an int array [num_images, 2] of (height, width), got shape {sizes.shape}"
        )
    for i, row in enumerate(sizes):
        _image_size(row, f"image_sizes[{i}]")
    return sizes.astype(np.int64)


def anyres_layout(
    image_sizes: Any,
    cfg: LlavaNextConfig,
    num_slots: int | None = None,
    input_ids: Any | None = None,
    attention_mask: Any | None = None,
) -> AnyresLayout:
    """The packed-token layout of images of `image_sizes` [M, 2] (height, width): one row
    per image, `num_slots` slots each (default: the most any of them needs; pass a bucket
    to share compiled shapes across batches).

    With `input_ids` [B, L] (and its left-padding `attention_mask`), also the visual layout
    of models.protocol: the images fill the real placeholders (attention_mask != 0) in
    reading order, each image within one row; a ValueError naming input_ids otherwise.
    """
    sizes = check_image_sizes(image_sizes)
    rows = [_image_index((int(h), int(w)), cfg) for h, w in sizes]
    need = max((len(r) for r in rows), default=0)
    if num_slots is None:
        num_slots = need
    elif int(num_slots) < need:
        raise ValueError(
            f"num_slots={num_slots} is too small: image_sizes need {need} visual tokens for one image"
        )
    slots = int(num_slots)
    index = np.full((len(rows), slots), NEWLINE, np.int32)
    valid = np.zeros((len(rows), slots), bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
        valid[i, : len(r)] = True
    if input_ids is None:
        return AnyresLayout(index, valid)
    row_index, image_index = _row_layout(
        input_ids, attention_mask, [len(r) for r in rows], slots, cfg
    )
    first = image_index[:, :, 0].reshape(-1)
    first = first[first >= 0]  # each image's first row slot, images in reading order
    tower = [_tower_layout((int(h), int(w)), int(n0), cfg) for (h, w), n0 in zip(sizes, first)]
    tower_slot, tower_order, tower_start = (
        np.stack([t[i] for t in tower])
        if tower
        else np.zeros((0, cfg.max_patches) + shape, np.int32)
        for i, shape in enumerate(((cfg.tokens_per_crop,), (cfg.tokens_per_crop,), ()))
    )
    return AnyresLayout(index, valid, row_index, image_index, tower_slot, tower_order, tower_start)


def _tower_layout(image_size: tuple[int, int], n0: int, cfg: LlavaNextConfig):
    """One image's tower layout (whose first placeholder is row slot `n0`): per crop (base view
    first, `cfg.max_patches` of them) and tower token, the row slot whose position it takes
    and its raster index in the crop grid's full map, plus each crop's map start. A crop
    token that unpadding cuts away takes the slot of the nearest token kept (its row and
    column clamped into the unpadded window); crops the image does not use get -1.
    Returns (slot int32 [C, P], order int32 [C, P], start int32 [C])."""
    side, tokens = cfg.tokens_per_side, cfg.tokens_per_crop
    rows, cols = anyres_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.crop_size)
    kept = unpadded_features_shape(image_size, (rows, cols), side)
    slot = np.full((cfg.max_patches, tokens), -1, np.int32)
    order = np.zeros((cfg.max_patches, tokens), np.int32)
    start = np.full((cfg.max_patches,), -1, np.int32)
    slot[0], order[0], start[0] = n0 + np.arange(tokens), np.arange(tokens), n0
    crop = np.arange(rows * cols)
    t = np.arange(tokens)
    r = (crop // cols)[:, None] * side + (t // side)[
        None
    ]  # [crops, P]: row and column in the full map
    c = (crop % cols)[:, None] * side + (t % side)[None]
    rr = np.clip(r, kept.top, kept.top + kept.rows - 1) - kept.top
    cc = np.clip(c, kept.left, kept.left + kept.cols - 1) - kept.left
    grid0 = n0 + tokens  # the crop grid's first slot; each of its rows ends in a newline slot
    slot[1 : 1 + rows * cols] = grid0 + rr * (kept.cols + 1) + cc
    order[1 : 1 + rows * cols] = r * (cols * side) + c
    start[1 : 1 + rows * cols] = grid0
    return slot, order, start


def _row_layout(input_ids, attention_mask, counts: list[int], slots: int, cfg: LlavaNextConfig):
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be an int array [batch, length], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}"
        )
    token = cfg.image_token_index
    placeholders = [
        np.flatnonzero(row == token) for row in ids
    ]  # every placeholder, masked ones too
    real = [
        np.flatnonzero(mask[b, p]) for b, p in enumerate(placeholders)
    ]  # row slots of the real ones
    found, expected = sum(len(r) for r in real), sum(counts)
    if found != expected:
        raise ValueError(
            f"input_ids holds {found} image tokens (id {token}) but the {len(counts)} image(s) of image_sizes need "
            f"{expected} (image_token_count per image)"
        )
    width = max((len(p) for p in placeholders), default=0)
    row_index = np.full((len(ids), width), -1, np.int32)
    per_row: list[list[np.ndarray]] = []
    image = 0
    for b, row_slots in enumerate(real):
        taken, images = 0, []
        while taken < len(row_slots):
            count = counts[image]
            if taken + count > len(row_slots):
                raise ValueError(
                    f"input_ids row {b}: image {image} needs {count} image tokens but the row has only "
                    f"{len(row_slots) - taken} left; each image's tokens must lie in one row"
                )
            mine = row_slots[taken : taken + count]
            row_index[b, mine] = image * slots + np.arange(count)
            images.append(mine)
            taken += count
            image += 1
        per_row.append(images)
    image_index = np.full((len(ids), max([len(r) for r in per_row] + [1]), slots), -1, np.int32)
    for b, images in enumerate(per_row):
        for i, mine in enumerate(images):
            image_index[b, i, : len(mine)] = mine
    return row_index, image_index


def check_inputs(
    cfg: LlavaNextConfig, pixel_values: Any, image_sizes: Any, input_ids: Any | None = None
) -> np.ndarray:
    """Host checks of one batch; every message names the argument. Returns image_sizes as
    int64 [num_images, 2].

    pixel_values [num_images, num_patches, C, S, S] must hold at least the crops each
    image needs; with input_ids, the placeholder count must equal the images' tokens.
    """
    vc = cfg.vision
    crop = (vc.num_channels, vc.image_size, vc.image_size)
    shape = tuple(np.shape(pixel_values))
    if len(shape) != 5 or shape[2:] != crop:
        raise ValueError(
            f"pixel_values must be a float array [num_images, num_patches, {', '.join(map(str, crop))}] "
            f"(the LLaVA-NeXT processor's crops), got shape {shape}"
        )
    sizes = check_image_sizes(image_sizes)
    if sizes.shape[0] != shape[0]:
        raise ValueError(
            f"image_sizes holds {sizes.shape[0]} image size(s) but pixel_values holds {shape[0]} image(s); "
            "give one (height, width) per image"
        )
    for i, size in enumerate(sizes):
        needed = image_num_patches(size, cfg)
        if needed > shape[1]:
            raise ValueError(
                f"image_sizes[{i}] = {tuple(int(v) for v in size)} needs {needed} crops (base view included) but "
                f"pixel_values has {shape[1]} per image; image_sizes does not match pixel_values"
            )
    if input_ids is not None:
        counts = [image_token_count(size, cfg) for size in sizes]
        _row_layout(input_ids, None, counts, max(counts, default=1), cfg)
    return sizes
