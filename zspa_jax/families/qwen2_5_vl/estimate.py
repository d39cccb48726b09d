"""Qwen2.5-VL's estimate hooks: the image grid, the windowed ViT and its merger.

The image is resized like the Qwen2-VL image processor (smart_resize: sides multiples of
patch*merge, pixels within min/max), giving a grid of P = h*w patches and N = P/4 visual
tokens. Vision block on P patches of width d, SwiGLU width m: 4*P*d^2 (qkv, proj) +
3*P*d*m (MLP) + attention 2*sum(s^2)*d over its segments s (each window of up to 64
patches for windowed blocks, the whole image for the `fullatt_block_indexes`) — the ideal
count, what transformers computes per window; our tower adds its slot bucket's padding
(< 10% of the patches from 256 patches on) and scores windows in chunks against 190 slots.
Patch embedding P*(3*2*p*p)*d; merger N*((4d)^2 + 4d*d_llm), counted in the vision FLOPs
(no separate projector). The LLM is the shared decoder count with L' = T + K
(zspa_jax.estimate.flops, same convention).

A video of F frames of height x width pixels is resized like the Qwen2-VL video processor
(smart_resize with its defaults, 128*28*28 to 768*28*28 pixels per frame), giving
t = F / temporal_patch_size temporal patches of the same h x w grid: N = t*h*w/4 visual
tokens and t times one frame's tower and merger FLOPs (windows and full attention are per
temporal patch, as in transformers). The frame rate only sets the temporal positions
(second_per_grid_ts = temporal_patch_size / fps; transformers' default 24 fps without one).
"""

from __future__ import annotations

import math

from models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from zspa_jax.estimate.hooks import EstimateHooks, ImagePlan
from zspa_jax.estimate.memory import dtype_bytes

__all__ = [
    "HOOKS",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "qwen_image_grid",
    "qwen_video_grid",
    "qwen_vision_flops",
]

VIDEO_MIN_PIXELS = 128 * 28 * 28  # Qwen2VLVideoProcessor's size["shortest_edge"] default
VIDEO_MAX_PIXELS = 768 * 28 * 28  # ... and size["longest_edge"]
DEFAULT_FPS = 24  # transformers' frame rate for a clip given without one


def qwen_image_grid(
    height: int,
    width: int,
    v: Qwen2_5_VLVisionConfig,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """(h, w) in patches of an image of height x width pixels after the Qwen2-VL image
    processor's smart_resize (its defaults for min/max pixels)."""
    factor = v.patch_size * v.spatial_merge_size
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h // v.patch_size, w // v.patch_size


def _qwen_window_sizes(gh: int, gw: int, v: Qwen2_5_VLVisionConfig) -> list[int]:
    """Patches per window of an image of gh x gw patches (edge windows smaller)."""
    m, win = v.spatial_merge_size, v.window_merged
    mh, mw = gh // m, gw // m
    rows = [min(win, mh - i) for i in range(0, mh, win)]
    cols = [min(win, mw - j) for j in range(0, mw, win)]
    return [r * c * m * m for r in rows for c in cols]


def qwen_vision_flops(cfg: Qwen2_5_VLConfig, gh: int, gw: int) -> int:
    """FLOPs of the tower + merger for one image of gh x gw patches."""
    v = cfg.vision
    p, d, m = gh * gw, v.hidden_size, v.intermediate_size
    windows = _qwen_window_sizes(gh, gw, v)
    dense = 4 * p * d * d + 3 * p * d * m
    macs = p * v.patch_dim * d
    for i in range(v.depth):
        attention = (
            2 * p * p * d if i in v.fullatt_block_indexes else 2 * sum(s * s for s in windows) * d
        )
        macs += dense + attention
    n = p // v.merge_unit
    width = d * v.merge_unit
    macs += n * (width * width + width * v.out_hidden_size)
    return 2 * macs


def _numel_qwen_vision(v: Qwen2_5_VLVisionConfig) -> int:
    d, m = v.hidden_size, v.intermediate_size
    block = (3 * d * d + 3 * d) + (d * d + d) + (3 * d * m + 2 * m + d) + 2 * d
    width = d * v.merge_unit
    merger = d + width * width + width + width * v.out_hidden_size + v.out_hidden_size
    return v.patch_dim * d + v.depth * block + merger


def _image(cfg: Qwen2_5_VLConfig, image_hw) -> ImagePlan:
    if image_hw is None:
        raise ValueError(
            "Qwen2.5-VL's visual tokens follow the image: give image_hw = (height, width) pixels"
        )
    gh, gw = qwen_image_grid(*image_hw, cfg.vision)
    return ImagePlan(
        visual_tokens=gh * gw // cfg.vision.merge_unit,
        tower_tokens=gh * gw,
        label=f"visual tokens of a {image_hw} image",
        grid=(gh, gw),
        report={"image_hw": list(image_hw), "grid_hw": [gh, gw]},
    )


def qwen_video_grid(
    frames: int,
    height: int,
    width: int,
    v: Qwen2_5_VLVisionConfig,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> tuple[int, int, int]:
    """(t, h, w) in patches of a clip of `frames` frames of height x width pixels after the
    Qwen2-VL video processor (its default min/max pixels per frame)."""
    tps = v.temporal_patch_size
    if frames < tps or frames % tps:
        raise ValueError(
            f"a video needs a positive multiple of temporal_patch_size={tps} frames (frames per temporal patch), "
            f"got {frames}"
        )
    h, w = qwen_image_grid(height, width, v, min_pixels, max_pixels)
    return frames // tps, h, w


def _video(cfg: Qwen2_5_VLConfig, video, fps) -> ImagePlan:
    frames, height, width = video
    v = cfg.vision
    t, gh, gw = qwen_video_grid(frames, height, width, v)
    fps = DEFAULT_FPS if fps is None else float(fps)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    seconds = v.temporal_patch_size / fps
    interval = float(v.tokens_per_second * seconds)
    return ImagePlan(
        visual_tokens=t * gh * gw // v.merge_unit,
        tower_tokens=t * gh * gw,
        label=f"visual tokens of a {frames}x{height}x{width} video",
        grid=(gh, gw),
        report={
            "video_frames_hw": [frames, height, width],
            "fps": fps,
            "grid_thw": [t, gh, gw],
            "second_per_grid_ts": seconds,
            # the largest temporal M-RoPE offset within the clip: (t - 1) x tokens_per_second x seconds
            "temporal_position_span": int((t - 1) * interval),
        },
        temporal_patches=t,
    )


HOOKS = EstimateHooks(
    image=_image,
    vision_flops=lambda cfg, plan: plan.temporal_patches * qwen_vision_flops(cfg, *plan.grid),
    projector_flops=lambda cfg, rows: 0,  # the merger is counted in vision_flops
    tower_dims=lambda cfg: None,  # no [CLS] token
    vision_weight_bytes=lambda cfg: _numel_qwen_vision(cfg.vision) * dtype_bytes(cfg.vision.dtype),
    projector_weight_bytes=lambda cfg: 0,
    image_sized=True,
    video=_video,
)
