"""The LLaVA-1.5 family: CLIP tower -> MLP projector -> LLaMA (models/llava.py, convert/llava.py).

Host side: a fixed number of visual tokens per image (N = patches, plus [CLS] under the
"full" strategy), NCHW pixel_values, no aux arrays; the array path is traceable, so
`generate_tokens` runs inside a caller's `jax.jit`. Strings + images go through the saved
transformers processor (`LlavaProcessor`) and the chat template (`processor`); the
estimate hooks count its tower and projector (`estimate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from models.llava import LlavaConfig, LlavaForConditionalGeneration
from zspa_jax.families.base import Family
from zspa_jax.families.llava.estimate import HOOKS as ESTIMATE_HOOKS
from zspa_jax.families.llava.processor import encode, load_processor
from zspa_jax.host import FamilyLayout, Spans
from zspa_jax.validation import (
    as_array,
    check_binary_mask,
    check_finite,
    check_ids_in_range,
    is_traced,
)

__all__ = ["FAMILY", "LlavaAdapter", "check_arrays", "encode"]


class CheckedArrays(NamedTuple):
    input_ids: Any  # int [B, L]
    pixel_values: Any | None  # float [M, C, H, W]
    attention_mask: Any | None  # [B, L] of 0/1


def check_arrays(
    vlm,
    input_ids,
    pixel_values,
    attention_mask,
) -> CheckedArrays:
    """Check the array API's inputs; messages name the argument and, for values, the row.

    Shapes and dtypes are always checked; values (finite pixels, ids within the
    vocabulary, 0/1 masks, placeholder counts) when the arrays are concrete. Returns the arrays (host values as NumPy; JAX arrays and tracers untouched).
    """
    ids = as_array("input_ids", input_ids, "integer", 2, "an int array [batch, length]")
    shape = tuple(ids.shape)
    mask = None
    if attention_mask is not None:
        mask = attention_mask if hasattr(attention_mask, "dtype") else np.asarray(attention_mask)
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {shape}, got {tuple(mask.shape)}"
            )
        if not (np.issubdtype(np.dtype(mask.dtype), np.number) or np.dtype(mask.dtype) == np.bool_):
            raise TypeError(
                f"attention_mask must be an array of 0/1 (int or bool), got dtype {mask.dtype}"
            )
    n = vlm.tokens_per_image
    pixels = None
    if pixel_values is not None:
        vc = vlm.config.vision
        expected = (vc.num_channels, vc.image_size, vc.image_size)
        layout = f"a float array [num_images, {', '.join(map(str, expected))}] (NCHW)"
        pixels = as_array("pixel_values", pixel_values, "floating", 4, layout)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be {layout}, got shape {tuple(pixels.shape)}")
    if is_traced(ids, mask, pixels):
        return CheckedArrays(ids, pixels, mask)

    check_ids_in_range(
        "input_ids", ids, vlm.config.text.vocab_size, allowed=(vlm.config.image_token_index,)
    )
    if mask is not None:
        check_binary_mask("attention_mask", mask)
        if (np.asarray(mask)[:, -1] == 0).any():
            raise ValueError(
                "attention_mask must be left-padded: the last position of every row must be a real token"
            )
    host_ids = np.asarray(ids)
    is_image = host_ids == vlm.config.image_token_index
    if pixels is None:
        if is_image.any():
            raise ValueError("input_ids holds image tokens but pixel_values is None")
        return CheckedArrays(ids, pixels, mask)
    check_finite("pixel_values", pixels, what="image")
    found, expected_count = int(is_image.sum()), pixels.shape[0] * n
    if found != expected_count:
        raise ValueError(
            f"input_ids holds {found} image tokens (id {vlm.config.image_token_index}) but pixel_values holds "
            f"{pixels.shape[0]} image(s) x {n} visual tokens = {expected_count}; each image needs "
            f"exactly {n} placeholders"
        )
    return CheckedArrays(ids, pixels, mask)


def images_per_row(vlm, ids, mask, pixels) -> np.ndarray:
    """int [B]: images in each row when pruning. Traced arrays need the same count in every
    row (pixel_values [B * I, ...]); concrete rows need whole spans of N placeholders each."""
    n = vlm.tokens_per_image
    rows = ids.shape[0]
    if is_traced(ids, mask, pixels):
        images, rest = divmod(pixels.shape[0], rows)
        if rest or not images:
            raise ValueError(
                f"pruning traced arrays needs the same number of images in every prompt: pixel_values holds "
                f"{pixels.shape[0]} image(s) for {rows} prompt(s); pass concrete arrays to mix image counts"
            )
        return np.full(rows, images)
    per_row = (np.asarray(ids) == vlm.config.image_token_index).sum(axis=1)
    for row, count in enumerate(per_row.tolist()):
        if count == 0 or count % n:
            raise ValueError(
                f"input_ids row {row}: pruning needs each prompt's images as whole spans of {n} placeholders, "
                f"found {count} image tokens"
            )
    return per_row // n


def _pad_images(pixels: np.ndarray, images: np.ndarray) -> np.ndarray:
    """[sum(images), C, H, W] -> [B * max(images), C, H, W]: each row's images, then blank
    ones (their placeholders are masked; no method can keep them)."""
    most = int(images.max())
    out = np.zeros((len(images) * most,) + pixels.shape[1:], pixels.dtype)
    starts = np.cumsum(np.concatenate([[0], images[:-1]]))
    for row, (start, count) in enumerate(zip(starts.tolist(), images.tolist())):
        out[row * most : row * most + count] = pixels[start : start + count]
    return out


class LlavaAdapter:
    """Fixed N per image, NCHW pixels, no aux; traced arrays pass through untouched."""

    def spans(self, vlm, input_ids, pixel_values, attention_mask, extras, prune, bucket) -> Spans:
        arrays = check_arrays(vlm, input_ids, pixel_values, attention_mask)
        ids, pixels, mask = arrays.input_ids, arrays.pixel_values, arrays.attention_mask
        if not is_traced(ids, mask):
            ids = np.asarray(ids, np.int32)
            mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
        if pixels is None:
            return Spans(ids, mask, None)
        n = vlm.tokens_per_image
        if prune is not None:
            images = images_per_row(vlm, ids, mask, pixels)
            items = [[n] * int(count) for count in images]
        elif is_traced(ids, mask, pixels):  # only the shapes are known
            items = [[n] * max(pixels.shape[0] // ids.shape[0], 1)] * ids.shape[0]
        else:  # a row's image tokens, in whole images (a rest only where a row splits one)
            per_row = (ids == vlm.config.image_token_index).sum(axis=1).tolist()
            items = [[n] * (c // n) + [c % n] * bool(c % n) for c in per_row]
        return Spans(ids, mask, items, (vlm.config.image_token_index,), state=pixels)

    def layout(self, vlm, spans: Spans, input_ids, attention_mask, slots) -> FamilyLayout:
        if spans.items is None:
            return FamilyLayout(None)
        pixels, images = spans.state, [len(r) for r in spans.items]
        if slots is not None and min(images) != max(images):  # the visual layout: I in every row
            pixels = _pad_images(np.asarray(pixels), np.asarray(images))
        grid = vlm.config.token_grid
        if grid is not None:
            per_row = max(images) if slots is not None else 1
            grid = np.tile(np.asarray(grid, np.int32), (len(images), per_row, 1))
        return FamilyLayout(pixels, None, grid)

    def last_row_arrays(self, vlm, ids: np.ndarray, extras) -> dict[str, int]:
        return {
            "pixel_values": int((ids[-1] == vlm.config.image_token_id).sum())
            // vlm.config.image_seq_length
        }

    def encode(self, vlm, prompts, images, chat_template, videos=None):
        if videos is not None:
            raise ValueError(
                "videos were given: video input is not supported by LLaVA models (images only)"
            )
        return encode(vlm, prompts, images, chat_template=chat_template)

    def load_processor(self, path: Path):
        return load_processor(path)


FAMILY = Family(
    name="llava",
    display_name="LLaVA",
    config_cls=LlavaConfig,
    model_cls=LlavaForConditionalGeneration,
    adapter=LlavaAdapter(),
    converter="convert.llava",
    has_cls=True,
    variable_tokens=False,
    tokens_per_image=lambda cfg: cfg.image_seq_length,
    estimate=ESTIMATE_HOOKS,
)
