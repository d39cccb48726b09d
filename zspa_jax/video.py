"""`Video`: one video for the string API (`zspa_jax.generate(..., videos=...)`, `encode`),
with its frame rate and how to sample its frames.

Plain frames work too: a list of PIL images or a uint8 array [T, H, W, 3] is a `Video`
with no frame rate and no sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Video"]


@dataclasses.dataclass(frozen=True)
class Video:
    """A clip and its timing, as transformers' video processors take them.

    frames: a list of PIL images (converted to RGB) or a uint8 array [T, H, W, 3]; all
      frames one size.
    fps: the frame rate of `frames` (transformers' `VideoMetadata.fps`). It sets the time
      between temporal patches, `second_per_grid_ts = temporal_patch_size / sampled_fps`
      (sampled_fps = fps x kept frames / frames), which spaces the video's temporal M-RoPE
      positions. None: transformers' default of 24 frames per second.
    num_frames: keep this many frames, evenly spaced (Qwen2-VL's `sample_frames`: rounded to
      a multiple of temporal_patch_size). Exclusive with `sample_fps`.
    sample_fps: keep this many frames per second of video (needs `fps`; Qwen2-VL's
      `sample_frames` with the processor's min_frames / max_frames).
    With neither, every frame is kept (unless the saved video processor config samples by
    default: `do_sample_frames` with its `fps` or `num_frames`).
    """

    frames: Any
    fps: float | None = None
    num_frames: int | None = None
    sample_fps: float | None = None

    def __post_init__(self):
        for name in ("fps", "sample_fps"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            ):
                raise ValueError(
                    f"Video.{name} must be a positive number of frames per second or None, got {value!r}"
                )
        if self.num_frames is not None and (
            isinstance(self.num_frames, bool)
            or not isinstance(self.num_frames, int)
            or self.num_frames < 1
        ):
            raise ValueError(
                f"Video.num_frames must be a positive integer or None, got {self.num_frames!r}"
            )
        if self.num_frames is not None and self.sample_fps is not None:
            raise ValueError(
                "Video.num_frames and Video.sample_fps are exclusive: give one way to sample frames"
            )
        if self.sample_fps is not None and self.fps is None:
            raise ValueError("Video.sample_fps needs Video.fps, the frame rate of the given frames")
