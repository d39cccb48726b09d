"""The LLaVA-NeXT family (anyres): CLIP tower over a base view and a crop grid -> MLP
projector -> unpadding and row newlines -> LLaMA (models/llava_next.py,
convert/llava_next.py).

Host side: an image's visual tokens follow its size (`image_sizes` [M, 2] (height, width),
from the processor), so inputs must be concrete; the anyres layout
(`models.llava_next.anyres_layout`) is the aux pytree. pixel_values are [M, crops, C, S, S];
with `bucket` they are padded to the config's most crops and each image's slots to a
multiple of SLOT_BUCKET, so batches of different image sizes share compiled programs.
Strings + images go through the saved `LlavaNextProcessor` exactly as for LLaVA-1.5.
The tower-stage methods (VisPruner, VisionZip) keep K tokens of every crop, base view
included, by that crop's own [CLS] attention (their official LLaVA-NeXT code; the layout is
`LlavaNextForConditionalGeneration.cls_tower`'s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.llava_next import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    anyres_layout,
    check_inputs,
    image_token_count,
)
from zspa_jax.estimate.llava_next import HOOKS as ESTIMATE_HOOKS
from zspa_jax.families.base import (
    Family,
    HostBatch,
    check_ids_and_mask,
    left_pad,
    pad_visual_slots,
    round_up,
)
from zspa_jax.families.llava import LlavaAdapter
from zspa_jax.validation import check_finite, check_ids_in_range, is_traced

__all__ = ["FAMILY", "LlavaNextAdapter"]

SLOT_BUCKET = 64  # image slots and each row's placeholders are padded to a multiple of this


class LlavaNextAdapter(LlavaAdapter):
    """Anyres layouts from `image_sizes`; strings + images and the processor as LLaVA-1.5."""

    def prepare(
        self,
        vlm,
        input_ids,
        pixel_values,
        attention_mask,
        extras,
        prune,
        extra_length,
        bucket,
        prompt_bucket=None,
    ) -> HostBatch:
        image_sizes = extras.get("image_sizes")
        if is_traced(input_ids, pixel_values, attention_mask, image_sizes):
            raise ValueError(
                "LLaVA-NeXT inputs must be concrete arrays: the anyres layout is computed on the host from image_sizes"
            )
        cfg: LlavaNextConfig = vlm.config
        ids, mask = check_ids_and_mask(input_ids, attention_mask)
        check_ids_in_range("input_ids", ids, cfg.text.vocab_size, allowed=(cfg.image_token_index,))
        prompt_tokens = mask.sum(1)
        if pixel_values is None:
            if image_sizes is not None:
                raise ValueError("image_sizes was given without pixel_values")
            if (ids == cfg.image_token_index).any():
                raise ValueError("input_ids holds image tokens but pixel_values is None")
            self._check_length(cfg, ids.shape[1], extra_length)
            if prompt_bucket:
                ids, mask = left_pad(ids, mask, prompt_bucket, vlm.pad_token_id)
            return HostBatch(ids, mask, None, None, 0, 0, prompt_tokens)
        if image_sizes is None:
            raise ValueError(
                "image_sizes is required with LLaVA-NeXT pixel_values: the processor returns it (int [num_images, 2] "
                "of height, width)"
            )
        pixels = np.asarray(pixel_values)
        if not np.issubdtype(pixels.dtype, np.floating):
            raise TypeError(
                f"pixel_values must be a float array of image crops, got dtype {pixels.dtype}"
            )
        sizes = check_inputs(cfg, pixels, image_sizes, np.where(mask != 0, ids, -1))
        check_finite("pixel_values", pixels, what="image")
        pixels = pixels.astype(np.float32)
        if bucket and pixels.shape[1] < cfg.max_patches:  # one crop count for every batch
            pixels = np.pad(
                pixels, ((0, 0), (0, cfg.max_patches - pixels.shape[1])) + ((0, 0),) * 3
            )
        counts = [image_token_count(s, cfg) for s in sizes]
        slots = round_up(max(counts), SLOT_BUCKET) if bucket else max(counts)
        per_row = ((ids == cfg.image_token_index) & (mask != 0)).sum(1)
        pruning = prune is not None
        if pruning:  # the visual layout: every row gets N placeholders (masked after its real ones)
            n = round_up(int(per_row.max()), SLOT_BUCKET) if bucket else int(per_row.max())
            ids, mask = pad_visual_slots(ids, mask, cfg.image_token_index, n, vlm.pad_token_id)
        images_per_row, keep, dropped, tower_rows = None, 0, 0, 0
        min_visual, min_image = int(per_row.min()), min(counts)
        if pruning:
            unpadded = anyres_layout(
                sizes, cfg, num_slots=slots, input_ids=ids, attention_mask=mask
            )
            images_per_row = (unpadded.image_index[:, :, 0] >= 0).sum(1)
            if (
                prune.record.needs_cls_attention
            ):  # K of each crop (base view included), as the official code
                tower_rows = self._tower_rows(
                    prune, images_per_row, pixels.shape[1], cfg.tokens_per_crop
                )
                min_visual = min_image = (
                    cfg.tokens_per_crop
                )  # what keep is bounded by and a ratio applies to
                keep = prune.keep_for(min_visual, min_image) * tower_rows
            else:
                keep = prune.row_keep(
                    min_visual, min_image, int(images_per_row.max())
                )  # too many: an error
            if not prune.record.llm_layer:  # the pruned prompt is padded to its own bucket
                dropped = int((ids == cfg.image_token_index).sum(1).max()) - keep
        if prompt_bucket:
            ids, mask = left_pad(ids, mask, prompt_bucket, vlm.pad_token_id, dropped)
        layout = anyres_layout(
            sizes, cfg, num_slots=slots, input_ids=ids if pruning else None, attention_mask=mask
        )
        saved = int(per_row.min()) - keep if pruning and not prune.record.llm_layer else 0
        self._check_length(cfg, int(prompt_tokens.max()) - saved, extra_length)
        n = layout.row_index.shape[1] if pruning else 0
        return HostBatch(
            ids,
            mask,
            pixels,
            layout,
            n,
            min_visual,
            prompt_tokens,
            per_row,
            image_grid=None,
            images_per_row=images_per_row,
            min_image_visual=min_image,
            tower_rows_per_row=tower_rows,
        )

    @staticmethod
    def _tower_rows(prune, images_per_row: np.ndarray, crops: int, tokens_per_crop: int) -> int:
        """Tower rows (crops, base views included) per row for a tower-stage method, which keeps
        K of each; a ValueError naming the argument when the batch cannot be served so."""
        if images_per_row.min() != images_per_row.max():
            raise ValueError(
                f"method {prune.method!r} prunes each crop of each image, so every prompt of a batch must hold the "
                f"same number of images, got {images_per_row.tolist()} per prompt: batch prompts by image count"
            )
        if prune.keep is not None and prune.keep > tokens_per_crop:
            raise ValueError(
                f"PruneConfig.keep={prune.keep} exceeds the {tokens_per_crop} tokens of one crop: on LLaVA-NeXT, method "
                f"{prune.method!r} keeps K tokens of every crop (the base view and each anyres crop)"
            )
        return int(images_per_row.max()) * crops

    @staticmethod
    def _check_length(cfg, length: int, extra_length: int) -> None:
        max_pos = cfg.text.max_position_embeddings
        if length + extra_length > max_pos:
            raise ValueError(
                f"the prompt ({length} tokens after pruning) plus max_new_tokens ({extra_length}) needs "
                f"{length + extra_length} positions; the model allows at most {max_pos}"
            )

    def last_row_arrays(self, vlm, ids: np.ndarray, extras) -> dict[str, int]:
        """The last row's images: its placeholders against the last images' token counts."""
        tokens = int((ids[-1] == vlm.config.image_token_id).sum())
        image_sizes = extras.get("image_sizes")
        sizes = (
            np.zeros((0, 2), np.int64)
            if image_sizes is None
            else np.asarray(image_sizes).reshape(-1, 2)
        )
        images = 0
        while tokens > 0 and images < len(sizes):
            images += 1
            tokens -= image_token_count(sizes[-images], vlm.config)
        return {"pixel_values": images, "image_sizes": images}

    def load_processor(self, path: Path):
        return super().load_processor(path)  # AutoProcessor gives the saved LlavaNextProcessor


FAMILY = Family(
    name="llava_next",
    display_name="LLaVA-NeXT",
    config_cls=LlavaNextConfig,
    model_cls=LlavaNextForConditionalGeneration,
    adapter=LlavaNextAdapter(),
    converter="convert.llava_next",
    has_cls=True,  # each crop's own [CLS]: the tower-stage methods keep K per crop
    variable_tokens=True,
    grid_tokens=False,
    visual_args=("image_sizes",),
    estimate=ESTIMATE_HOOKS,
)
