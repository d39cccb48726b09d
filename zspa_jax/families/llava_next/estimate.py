"""LLaVA-NeXT's estimate hooks: an image becomes a base view plus an anyres crop grid, each
crop one CLIP pass and one projector pass; the visual tokens follow the image size
(`layout.image_token_count`, newlines included). The [CLS]-attention methods
keep K tokens of every crop (base view included), as their official LLaVA-NeXT code does."""

from __future__ import annotations

from models.llava_next import LlavaNextConfig
from zspa_jax.estimate.hooks import EstimateHooks, ImagePlan
from zspa_jax.estimate.memory import dtype_bytes
from zspa_jax.families.llava.estimate import (
    _numel_projector,
    _numel_vision,
    projector_flops,
    vision_flops,
)
from zspa_jax.families.llava_next.layout import image_num_patches, image_token_count

__all__ = ["HOOKS"]


def _image(cfg: LlavaNextConfig, image_hw) -> ImagePlan:
    if image_hw is None:
        raise ValueError("LLaVA-NeXT's visual tokens follow the image: give its size (--image HxW)")
    crops = image_num_patches(image_hw, cfg)
    return ImagePlan(
        visual_tokens=image_token_count(image_hw, cfg),
        tower_tokens=crops * (cfg.tokens_per_crop + 1),
        label=f"visual tokens of a {tuple(image_hw)} image",
        report={"image_hw": list(image_hw), "crops": crops},
        tower_rows=(crops, cfg.tokens_per_crop),  # VisPruner / VisionZip keep K of every crop
    )


HOOKS = EstimateHooks(
    image=_image,
    # Every crop runs the tower and the projector; unpadding drops tokens only after them.
    vision_flops=lambda cfg, plan: (
        plan.report["crops"] * (vision_flops(cfg) + projector_flops(cfg, cfg.tokens_per_crop))
    ),
    projector_flops=lambda cfg, rows: 0,  # counted per crop in vision_flops
    tower_dims=lambda cfg: (
        cfg.vision.hidden_size,
        cfg.vision.hidden_size // cfg.vision.num_attention_heads,
    ),
    vision_weight_bytes=lambda cfg: _numel_vision(cfg.vision) * dtype_bytes(cfg.vision.dtype),
    projector_weight_bytes=lambda cfg: (
        (_numel_projector(cfg) + cfg.text.hidden_size) * dtype_bytes(cfg.text.dtype)
    ),
    image_sized=True,
    reports_decode_weights=True,
)
