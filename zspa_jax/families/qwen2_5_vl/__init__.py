"""The Qwen2.5-VL family: native-resolution windowed ViT -> patch merger -> Qwen2 with M-RoPE
(models/qwen2_5_vl.py, convert/qwen2_5_vl.py).

Host side: grids, window layouts and 3-D positions computed from `image_grid_thw`
(`layout.prepare_batch`); the tower's window count and, when pruning, each
image span padded to buckets so images of different sizes share compiled programs; rows
carry different numbers of visual tokens (a valid mask). Strings + images go through the
saved tokenizer, chat template and Qwen2-VL image processor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from zspa_jax.estimate.qwen2_5_vl import HOOKS as ESTIMATE_HOOKS
from zspa_jax.families.base import Family, HostBatch, check_ids_and_mask, is_traced, round_up
from zspa_jax.families.qwen2_5_vl import layout
from zspa_jax.families.qwen2_5_vl.processor import QwenProcessor
from zspa_jax.validation import check_finite, check_ids_in_range

__all__ = ["FAMILY", "QwenAdapter", "QwenProcessor"]

WINDOW_BUCKET_MIN = 4  # the tower's window count is padded to a power of two >= this
SPAN_BUCKET = 64  # pruning: each row's placeholder slots (and image widths) padded to a multiple of this


class QwenAdapter:
    """Qwen2.5-VL: grids, window layouts and 3-D positions computed here from
    `image_grid_thw`; tower patches and pruned spans padded to buckets when `bucket`."""

    def prepare(self, vlm, input_ids, pixel_values, attention_mask, extras, prune, extra_length, bucket,
                prompt_bucket=None):
        image_grid_thw = extras.get("image_grid_thw")
        if is_traced(input_ids, pixel_values, attention_mask, image_grid_thw):
            raise ValueError(
                "Qwen2.5-VL inputs must be concrete arrays: window layouts and 3-D positions are computed "
                "on the host from image_grid_thw"
            )
        ids, mask = check_ids_and_mask(input_ids, attention_mask)
        cfg = vlm.config
        check_ids_in_range("input_ids", ids, cfg.text.vocab_size)
        if pixel_values is not None:
            pixels = np.asarray(pixel_values)
            if not np.issubdtype(pixels.dtype, np.floating):
                raise TypeError(f"pixel_values must be a float array of flattened patches, got dtype {pixels.dtype}")
            if pixels.size:
                check_finite("pixel_values", pixels, what="patch row")
        pruning = prune is not None and pixel_values is not None
        grid = None if image_grid_thw is None else np.asarray(image_grid_thw)
        windows = None
        if bucket and pixel_values is not None and grid is not None and grid.ndim == 2 and grid.shape[-1] == 3:
            layout.check_grid(grid, cfg.vision)
            needed = layout.num_windows(grid, cfg.vision)
            windows = max(WINDOW_BUCKET_MIN, 1 << max(needed - 1, 0).bit_length())
        batch = layout.prepare_batch(
            cfg,
            ids,
            mask,
            pixel_values,
            grid,
            visual_layout=pruning,
            slot_multiple=SPAN_BUCKET if bucket and pruning else None,
            windows=windows,
            pad_id=vlm.pad_token_id,
            prompt_multiple=prompt_bucket,
        )
        aux = batch.aux
        n = 0 if aux.visual_index is None else aux.visual_index.shape[1]
        per_row = (aux.feature_index >= 0).sum(axis=1)  # real visual tokens per row
        images = batch.pixel_values is not None
        min_visual = int(per_row.min()) if images else 0
        min_image = int(layout.image_token_counts(grid, cfg.vision).min()) if images else 0
        dropped = 0
        if pruning:
            keep = prune.row_keep(min_visual, min_image, int(batch.images_per_row.max()))  # too large: a clear error
            dropped = 0 if prune.record.llm_layer else n - keep
        batch_max = int(aux.next_position.max()) if aux.next_position.size else 0
        length = batch.input_ids.shape[1] - dropped
        max_pos = cfg.text.max_position_embeddings
        if max(batch_max, length) + extra_length > max_pos:
            raise ValueError(
                f"the prompt (positions up to {batch_max}) plus max_new_tokens ({extra_length}) needs "
                f"{max(batch_max, length) + extra_length} positions; the model allows at most {max_pos}"
            )
        return HostBatch(
            batch.input_ids, batch.attention_mask, batch.pixel_values, aux, n, min_visual, mask.sum(1),
            per_row if images else None, image_grid=aux.image_grid, images_per_row=batch.images_per_row,
            min_image_visual=min_image,
        )

    def last_row_arrays(self, vlm, ids: np.ndarray, extras) -> dict[str, int]:
        """The last row's images and patch rows: its placeholders, matched against the last
        images' t*h*w / merge^2 tokens."""
        tokens = int((ids[-1] == vlm.config.image_token_id).sum())
        image_grid_thw = extras.get("image_grid_thw")
        grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
        images = patches = 0
        while tokens > 0 and images < len(grid):
            images += 1
            size = int(np.prod(grid[-images]))
            patches += size
            tokens -= size // vlm.config.vision.merge_unit
        return {"pixel_values": patches, "image_grid_thw": images}

    def encode(self, vlm, prompts, images, chat_template):
        if vlm.processor is None:
            raise ValueError(f"{vlm.path} has no saved tokenizer/image processor, so give input_ids and pixel_values")
        return vlm.processor.encode(prompts, images, chat_template)

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
    visual_args=("image_grid_thw",),
    estimate=ESTIMATE_HOOKS,
)
