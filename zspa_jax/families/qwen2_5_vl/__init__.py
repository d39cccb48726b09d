"""The Qwen2.5-VL family: native-resolution windowed ViT -> patch merger -> Qwen2 with M-RoPE
(models/qwen2_5_vl.py, convert/qwen2_5_vl.py).

Host side: grids, window layouts and 3-D positions computed from `image_grid_thw` and
`video_grid_thw` (`layout.check_items`, then `layout.lay_out` once zspa_jax.host has padded
the ids); images and videos (transformers' arrays: pixel_values_videos, video_grid_thw,
second_per_grid_ts) go through the tower as one patch array in reading order; the tower's
patch slots (a ladder of buckets <= 10% apart from 256 patches), each video's temporal
patches and, when pruning, each item span padded to buckets so items of different sizes
and clips of different lengths share compiled programs; rows carry different numbers of
visual tokens (a valid mask). Strings + images + frames go through the saved tokenizer,
chat template, Qwen2-VL image processor and the video processor's settings (`processor`,
`video`); the estimate hooks count its tower (`estimate`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from zspa_jax.families.base import Family
from zspa_jax.families.qwen2_5_vl import layout
from zspa_jax.families.qwen2_5_vl.estimate import HOOKS as ESTIMATE_HOOKS
from zspa_jax.families.qwen2_5_vl.processor import QwenProcessor
from zspa_jax.host import FamilyLayout, Spans, check_ids_and_mask
from zspa_jax.validation import check_finite, check_ids_in_range, is_traced

__all__ = ["FAMILY", "QwenAdapter", "QwenProcessor"]

SPAN_BUCKET = 64  # pruning: each row's placeholder slots (and item widths) padded to a multiple
VIDEO_ARGS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class QwenAdapter:
    """Qwen2.5-VL: grids, window layouts and 3-D positions computed here from
    `image_grid_thw` / `video_grid_thw`; images and videos go through the tower as one
    patch array in reading order; tower patches and video lengths padded to buckets when
    `bucket`."""

    def spans(self, vlm, input_ids, pixel_values, attention_mask, extras, prune, bucket) -> Spans:
        image_grid_thw = extras.get("image_grid_thw")
        videos = {name: extras.get(name) for name in VIDEO_ARGS}
        if is_traced(input_ids, pixel_values, attention_mask, image_grid_thw, *videos.values()):
            raise ValueError(
                "Qwen2.5-VL inputs must be concrete arrays: window layouts and 3-D positions are computed "
                "on the host from image_grid_thw and video_grid_thw"
            )
        ids, mask = check_ids_and_mask(input_ids, attention_mask)
        cfg = vlm.config
        check_ids_in_range("input_ids", ids, cfg.text.vocab_size)
        for name, value in (
            ("pixel_values", pixel_values),
            ("pixel_values_videos", videos["pixel_values_videos"]),
        ):
            if value is None:
                continue
            pixels = np.asarray(value)
            if not np.issubdtype(pixels.dtype, np.floating):
                raise TypeError(
                    f"{name} must be a float array of flattened patches, got dtype {pixels.dtype}"
                )
            if pixels.size:
                check_finite(name, pixels, what="patch row")
        if prune is not None and prune.record.needs_grid and videos["video_grid_thw"] is not None:
            frames = (
                np.asarray(videos["video_grid_thw"]).reshape(-1, 3)[:, 0]
                if np.size(videos["video_grid_thw"])
                else []
            )
            if any(int(t) > 1 for t in frames):
                raise ValueError(
                    f"method {prune.method!r} pools one image's 2-D token grid; a video of more than one temporal "
                    "patch (video_grid_thw t > 1) has a 3-D grid, and 3-D pooling is not implemented: use another "
                    "method (e.g. zspaprune) for videos"
                )
        items = layout.check_items(
            cfg, ids, mask, pixel_values, image_grid_thw, bucket=bool(bucket), **videos
        )
        if items is None:
            return Spans(ids, mask, None, state=(items, bool(bucket)))
        if prune is not None and not all(items.per_row):
            raise ValueError(
                f"pruning needs at least one image or video in every prompt: items per row {items.per_row}"
            )
        return Spans(
            ids,
            mask,
            items.by_row(items.tokens),
            (cfg.image_token_id, cfg.video_token_id),
            item_slots=items.by_row(items.shaped_tokens),
            slot_multiple=SPAN_BUCKET,
            state=(items, bool(bucket)),
        )

    def layout(self, vlm, spans: Spans, input_ids, attention_mask, slots) -> FamilyLayout:
        items, bucket = spans.state
        pixels, aux = layout.lay_out(
            vlm.config,
            items,
            input_ids,
            attention_mask,
            visual_layout=slots is not None,
            slot_multiple=SPAN_BUCKET if bucket else None,
            bucket=bucket,
        )
        return FamilyLayout(pixels, aux, aux.image_grid, aux.next_position)

    def last_row_arrays(self, vlm, ids: np.ndarray, extras) -> dict[str, int]:
        """The last row's trailing images and videos: its placeholders of each kind, matched
        against the last grids' t*h*w / merge^2 tokens (patch rows, grids, and one
        second_per_grid_ts entry per video)."""
        cfg = vlm.config
        out = {}
        for token, pixels_name, grid_name in (
            (cfg.image_token_id, "pixel_values", "image_grid_thw"),
            (cfg.video_token_id, "pixel_values_videos", "video_grid_thw"),
        ):
            tokens = int((ids[-1] == token).sum())
            given = extras.get(grid_name)
            grid = np.zeros((0, 3), np.int64) if given is None else np.asarray(given).reshape(-1, 3)
            items = patches = 0
            while tokens > 0 and items < len(grid):
                items += 1
                size = int(np.prod(grid[-items]))
                patches += size
                tokens -= size // cfg.vision.merge_unit
            out[pixels_name], out[grid_name] = patches, items
        out["second_per_grid_ts"] = out["video_grid_thw"]
        return out

    def encode(self, vlm, prompts, images, chat_template, videos=None):
        if vlm.processor is None:
            raise ValueError(
                f"{vlm.path} has no saved tokenizer/image processor, so give input_ids and pixel_values"
            )
        return vlm.processor.encode(prompts, images, chat_template, videos=videos)

    def load_processor(self, path: Path):
        return QwenProcessor.load(path)


FAMILY = Family(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    config_cls=Qwen2_5_VLConfig,
    model_cls=Qwen2_5_VLForConditionalGeneration,
    adapter=QwenAdapter(),
    converter="convert.qwen2_5_vl",
    has_cls=False,
    variable_tokens=True,
    visual_args=("image_grid_thw",) + VIDEO_ARGS,
    video_args=VIDEO_ARGS,
    estimate=ESTIMATE_HOOKS,
)
