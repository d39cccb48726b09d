"""A family's estimate hooks: what the generic estimate (zspa_jax.estimate.model) asks a
family about its image side. Each family's record carries one (`Family.estimate`).

The LLM side (decoder prefill/decode, pruning, KV cache, decoder weights) is shared
(zspa_jax.estimate.flops, zspa_jax.estimate.memory); the hooks count everything before
the LLM: how many visual tokens an image becomes, the tower's (and projector's) FLOPs and
weight bytes, and the tower widths the tower-stage methods read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["EstimateHooks", "ImagePlan"]


class ImagePlan(NamedTuple):
    """What one image becomes in a family (the `image` hook's answer)."""

    visual_tokens: int  # N: visual tokens handed to pruning and the LLM
    tower_tokens: int  # tokens the vision tower runs on
    label: str  # what N counts, for errors ("visual tokens", "visual tokens of a (448, 448) image")
    grid: tuple[int, int] | None = None  # the patch grid (rows, cols) when the image sets it
    report: dict[str, Any] | None = None  # entries the estimate reports right after "batch"
    # a video's temporal patches (the tower runs each on the grid); 1 for an image
    temporal_patches: int = 1
    # (R, P): a [CLS] method keeps K of each of R tower rows of P
    tower_rows: tuple[int, int] | None = None
    # tokens (LLaVA-NeXT's crops); None: K of the N visual tokens


@dataclasses.dataclass(frozen=True)
class EstimateHooks:
    """One family's image-side counts (all per image / per call of one image).

    image(cfg, image_hw) -> ImagePlan: image_hw = (height, width) pixels, or None where
      the family has one fixed input size (`image_sized` False: image_hw is ignored).
    vision_flops(cfg, plan) -> int: the tower for one image (with the merger where the
      family fuses it into the tower).
    projector_flops(cfg, rows) -> int: the projector on `rows` tokens (N, or K after a
      method that merges in tower space); 0 where it is part of vision_flops.
    tower_dims(cfg) -> (tower width C, head width Dh) read by the tower-stage methods, or
      None where the tower has no [CLS] token (those methods are refused).
    vision_weight_bytes(cfg), projector_weight_bytes(cfg) -> int: parameter bytes.
    tower_report(cfg) -> dict: entries reported right after "vision_tokens_in_tower".
    reports_decode_weights: the estimate includes "decode_weight_bytes_per_token".
    video(cfg, (frames, height, width), fps) -> ImagePlan: what one clip becomes (families
      that take video; None: video is refused); vision_flops then counts the whole clip.
    """

    image: Callable[[Any, tuple[int, int] | None], ImagePlan]
    vision_flops: Callable[[Any, ImagePlan], int]
    projector_flops: Callable[[Any, int], int]
    tower_dims: Callable[[Any], tuple[int, int] | None]
    vision_weight_bytes: Callable[[Any], int]
    projector_weight_bytes: Callable[[Any], int]
    tower_report: Callable[[Any], dict[str, Any]] = lambda cfg: {}
    image_sized: bool = False
    reports_decode_weights: bool = False
    video: Callable[[Any, tuple[int, int, int], float | None], ImagePlan] | None = None
