"""The LLaVA-NeXT family (anyres): CLIP tower over a base view and a crop grid -> MLP
projector -> unpadding and row newlines -> LLaMA (models/llava_next.py,
convert/llava_next.py).

Host side: an image's visual tokens follow its size (`image_sizes` [M, 2] (height, width),
from the processor), so inputs must be concrete; the anyres layout
(`layout.anyres_layout`, the geometry in numpy) is the aux pytree. pixel_values are [M, crops, C, S, S];
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

from models.llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration
from zspa_jax.families.base import Family
from zspa_jax.families.llava import LlavaAdapter
from zspa_jax.families.llava_next.estimate import HOOKS as ESTIMATE_HOOKS
from zspa_jax.families.llava_next.layout import anyres_layout, check_inputs, image_token_count
from zspa_jax.host import FamilyLayout, Spans, check_ids_and_mask, round_up
from zspa_jax.validation import check_finite, check_ids_in_range, is_traced

__all__ = ["FAMILY", "LlavaNextAdapter"]

SLOT_BUCKET = 64  # image slots and each row's placeholders are padded to a multiple of this


class LlavaNextAdapter(LlavaAdapter):
    """Anyres layouts from `image_sizes`; strings + images and the processor as LLaVA-1.5."""

    def spans(self, vlm, input_ids, pixel_values, attention_mask, extras, prune, bucket) -> Spans:
        image_sizes = extras.get("image_sizes")
        if is_traced(input_ids, pixel_values, attention_mask, image_sizes):
            raise ValueError(
                "LLaVA-NeXT inputs must be concrete arrays: the anyres layout is computed on the host from image_sizes"
            )
        cfg: LlavaNextConfig = vlm.config
        ids, mask = check_ids_and_mask(input_ids, attention_mask)
        check_ids_in_range("input_ids", ids, cfg.text.vocab_size, allowed=(cfg.image_token_index,))
        if pixel_values is None:
            if image_sizes is not None:
                raise ValueError("image_sizes was given without pixel_values")
            if (ids == cfg.image_token_index).any():
                raise ValueError("input_ids holds image tokens but pixel_values is None")
            return Spans(ids, mask, None)
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
        # Each image's tokens lie in one row, in reading order (check_inputs made sure).
        items, image = [], 0
        for row in ((ids == cfg.image_token_index) & (mask != 0)).sum(1).tolist():
            mine = []
            while row > 0:
                mine.append(counts[image])
                row, image = row - counts[image], image + 1
            items.append(mine)
        tower_rows = 0
        if prune is not None and prune.record.needs_cls_attention:
            # K of each crop (base view included), as the official code
            tower_rows = self._tower_rows(
                prune, np.asarray([len(r) for r in items]), pixels.shape[1], cfg.tokens_per_crop
            )
        return Spans(
            ids,
            mask,
            items,
            (cfg.image_token_index,),
            slot_multiple=SLOT_BUCKET,
            tower_rows_per_row=tower_rows,
            tower_row_tokens=cfg.tokens_per_crop,
            state=(pixels, sizes, round_up(max(counts), SLOT_BUCKET) if bucket else max(counts)),
        )

    def layout(self, vlm, spans: Spans, input_ids, attention_mask, slots) -> FamilyLayout:
        pixels, sizes, image_slots = spans.state
        pruning = slots is not None
        layout = anyres_layout(
            sizes,
            vlm.config,
            num_slots=image_slots,
            input_ids=input_ids if pruning else None,
            attention_mask=attention_mask,
        )
        return FamilyLayout(pixels, layout)

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
