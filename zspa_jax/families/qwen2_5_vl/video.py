"""Frames -> Qwen2.5-VL's video arrays, as transformers' Qwen2-VL video processor computes them.

transformers' `Qwen2VLVideoProcessor` needs torchvision (absent here), so the same steps
are written out in numpy (tests/test_qwen2_5_vl_video.py checks them against a reference
of transformers' code, and against transformers itself where torchvision loads):

1. frames -> uint8 RGB [T, H, W, 3] (all one size), sampled when asked: `sample_frames`
   (num_frames rounded to a multiple of temporal_patch_size; or `fps` frames per second
   within min_frames / max_frames), indices `torch.arange(0, T, T / n).int()`;
2. smart_resize(H, W, patch * merge, shortest_edge, longest_edge) (with
   `cap_pixels_per_frame`, the longest edge capped by the clip's share of
   max_video_tokens) and torchvision's antialiased bicubic uint8 resize (`resize.py`);
3. fused rescale + normalise in float32: (x - mean / rescale_factor) / (std / rescale_factor);
4. patchify: temporal_patch_size frames per temporal patch, rows in merge-block order,
   each row C x temporal_patch_size x patch x patch;
5. video_grid_thw = (T / temporal_patch_size, H' / patch, W' / patch) and
   second_per_grid_ts = temporal_patch_size / sampled_fps (what Qwen2_5_VLProcessor adds;
   sampled_fps is the frame rate after sampling, transformers' default 24 without one).

A frame count that is not a multiple of temporal_patch_size is refused (transformers'
processor would repeat the last frame to fill the last temporal patch).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from zspa_jax.families.images import to_rgb
from zspa_jax.families.qwen2_5_vl.resize import resize_bicubic_uint8
from zspa_jax.video import Video

__all__ = ["VideoSettings", "process_videos", "sample_indices", "smart_resize"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_FPS = 24  # transformers' VideoMetadata.sampled_fps without a frame rate
BICUBIC = 3  # PIL's resample code; the only one implemented


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """The fields of transformers' Qwen2VLVideoProcessor (its class defaults), read from a
    checkpoint's saved video processor config."""

    shortest_edge: int = 128 * 28 * 28  # min pixels per frame
    longest_edge: int = 28 * 28 * 768  # max pixels per frame
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC
    do_sample_frames: bool = False
    fps: float | None = None  # sampling rate when do_sample_frames
    num_frames: int | None = None  # frames kept when do_sample_frames
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    source: str = "defaults"  # the file the settings came from

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> VideoSettings:
        """As `Qwen2VLVideoProcessor(**d)`: min_pixels / max_pixels override size."""
        size = dict(d.get("size") or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in fields & set(d) if d[k] is not None and k not in ("source",)}
        edges = {
            "shortest_edge": size.get("shortest_edge"),
            "longest_edge": size.get("longest_edge"),
        }
        if d.get("min_pixels") is not None:
            edges["shortest_edge"] = d["min_pixels"]
        if d.get("max_pixels") is not None:
            edges["longest_edge"] = d["max_pixels"]
        kwargs.update({k: int(v) for k, v in edges.items() if v is not None})
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(
                    float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)
                )
        settings = cls(**kwargs, source=source)
        if settings.do_resize and settings.resample != BICUBIC:
            raise ValueError(
                f"{source}: video processor resample={settings.resample} is not implemented (only bicubic, 3, "
                "what Qwen2-VL's video processor uses)"
            )
        return settings

    @classmethod
    def load(cls, path: Path) -> VideoSettings:
        """transformers' order: processor_config.json's "video_processor", then
        video_preprocessor_config.json, then preprocessor_config.json; class defaults
        without any."""
        path = Path(path)
        nested = path / "processor_config.json"
        if nested.exists():
            d = json.loads(nested.read_text())
            if isinstance(d.get("video_processor"), dict):
                return cls.from_dict(d["video_processor"], str(nested))
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (path / name).exists():
                return cls.from_dict(json.loads((path / name).read_text()), str(path / name))
        return cls()


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """transformers' Qwen2-VL smart_resize: sides multiples of `factor`, pixels within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_indices(
    total: int,
    settings: VideoSettings,
    num_frames=None,
    fps=None,
    video_fps=None,
    name: str = "video",
) -> np.ndarray:
    """Qwen2VLVideoProcessor.sample_frames: the indices of the frames kept."""
    tps = settings.temporal_patch_size
    if num_frames is not None:
        num = round(num_frames / tps) * tps
    elif fps is not None:
        if video_fps is None:
            raise ValueError(
                f"{name}: sampling at fps={fps} needs the video's frame rate (Video.fps)"
            )
        max_frames = math.floor(min(settings.max_frames, total) / tps) * tps
        num = total / video_fps * fps
        num = min(max(num, settings.min_frames), max_frames, total)
        num = math.floor(num / tps) * tps
    else:
        return np.arange(total)
    if num < 1:
        raise ValueError(
            f"{name}: sampling keeps {num} frames of {total} (temporal_patch_size={tps}): give more frames or sample more"
        )
    if num > total:
        raise ValueError(
            f"{name}: can't sample {num} frames from {total} (num_frames={num_frames}, fps={fps}): decrease them"
        )
    # torch.arange(0, total, total / num): double arithmetic, float32 values, then .int()
    step = total / num
    count = math.ceil(total / step)
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def _frames(video: Any, name: str) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] from a list of PIL frames / [H, W, 3] arrays or a [T, H, W, 3] array."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{name} has no frames")
        frames = []
        for j, frame in enumerate(video):
            frame = to_rgb(frame, f"{name}[{j}]")
            frames.append(_frame_array(np.asarray(frame), f"{name}[{j}]"))
        sizes = sorted({f.shape[:2] for f in frames})
        if len(sizes) > 1:
            first = frames[0].shape[:2]
            j = next(j for j, f in enumerate(frames) if f.shape[:2] != first)
            raise ValueError(
                f"{name}: all frames of a video must have one size; frame 0 is {first[0]}x{first[1]} and frame {j} is "
                f"{frames[j].shape[0]}x{frames[j].shape[1]} (height x width)"
            )
        return np.stack(frames)
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"{name} must be a list of frames (PIL images or [H, W, 3] arrays) or a uint8 array [frames, height, width, 3], "
            f"got shape {array.shape}"
        )
    if array.dtype != np.uint8:
        raise TypeError(f"{name} must hold uint8 pixels (0..255), got dtype {array.dtype}")
    if array.shape[0] < 1:
        raise ValueError(f"{name} has no frames")
    return array


def _frame_array(frame: np.ndarray, name: str) -> np.ndarray:
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{name} must be an RGB frame [height, width, 3], got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise TypeError(f"{name} must hold uint8 pixels (0..255), got dtype {frame.dtype}")
    return frame


def process_video(
    video: Any, settings: VideoSettings, name: str = "video"
) -> tuple[np.ndarray, np.ndarray, float]:
    """One video -> (pixel_values_videos f32 [t*h*w, C*T*p*p], video_grid_thw int64 [3],
    second_per_grid_ts as float32)."""
    spec = video if isinstance(video, Video) else Video(video)
    frames = _frames(spec.frames, name)
    total = frames.shape[0]
    tps = settings.temporal_patch_size
    num_frames, sample_fps = spec.num_frames, spec.sample_fps
    if num_frames is None and sample_fps is None and settings.do_sample_frames:
        num_frames, sample_fps = settings.num_frames, settings.fps
        if num_frames is not None and sample_fps is not None:
            raise ValueError(f"{settings.source}: num_frames and fps are mutually exclusive")
    sampled = num_frames is not None or sample_fps is not None
    if sampled:
        indices = sample_indices(total, settings, num_frames, sample_fps, spec.fps, name)
        frames = frames[indices]
    if frames.shape[0] % tps:
        raise ValueError(
            f"{name} has {frames.shape[0]} frames{' after sampling' if sampled else ''}, not a multiple of "
            f"temporal_patch_size={tps} (frames per temporal patch): give a multiple, or sample with "
            "Video(frames, num_frames=...) (transformers' processor would repeat the last frame)"
        )
    x = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))  # [T, C, H, W]
    t, c, height, width = x.shape
    factor = settings.patch_size * settings.merge_size
    if settings.do_resize:
        max_pixels = settings.longest_edge
        if settings.cap_pixels_per_frame:
            budget = int(settings.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, budget * tps // t), int(settings.shortest_edge * 1.05))
        try:
            rh, rw = smart_resize(height, width, factor, settings.shortest_edge, max_pixels)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        x = resize_bicubic_uint8(x, rh, rw)
    else:
        rh, rw = height, width
        if rh % factor or rw % factor:
            raise ValueError(
                f"{name}: frames of {rh}x{rw} are not multiples of {factor} and do_resize is off"
            )
    x = x.astype(np.float32)
    if settings.do_normalize:
        scale = 1.0 / settings.rescale_factor if settings.do_rescale else 1.0
        mean = np.asarray(settings.image_mean, np.float32) * np.float32(scale)
        std = np.asarray(settings.image_std, np.float32) * np.float32(scale)
        x = (x - mean[:, None, None]) / std[:, None, None]
    elif settings.do_rescale:
        x = x * np.float32(settings.rescale_factor)
    p, m = settings.patch_size, settings.merge_size
    gt, gh, gw = t // tps, rh // p, rw // p
    patches = x.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p).transpose(
        0, 3, 6, 4, 7, 2, 1, 5, 8
    )
    patches = patches.reshape(gt * gh * gw, c * tps * p * p)
    fps = spec.fps
    if fps is None:
        sampled_fps = DEFAULT_FPS
    else:
        sampled_fps = frames.shape[0] / total * fps if sampled else fps
    return patches, np.array([gt, gh, gw], np.int64), np.float32(tps / sampled_fps)


def process_videos(
    videos: list, settings: VideoSettings, names: list[str]
) -> dict[str, np.ndarray]:
    """Several videos -> pixel_values_videos (concatenated), video_grid_thw [n, 3] and
    second_per_grid_ts float32 [n]."""
    out = [process_video(v, settings, n) for v, n in zip(videos, names)]
    return {
        "pixel_values_videos": np.concatenate([o[0] for o in out]).astype(np.float32),
        "video_grid_thw": np.stack([o[1] for o in out]).astype(np.int64),
        "second_per_grid_ts": np.asarray([o[2] for o in out], np.float32),
    }
