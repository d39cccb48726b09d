"""Qwen2.5-VL's strings + images + videos -> arrays: the saved tokenizer, chat template,
Qwen2-VL image processor and video processor settings, doing what transformers'
Qwen2_5_VLProcessor does."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from zspa_jax.families.images import images_per_prompt, to_rgb
from zspa_jax.families.qwen2_5_vl.video import VideoSettings, process_videos
from zspa_jax.video import Video

__all__ = ["QwenProcessor"]


@dataclasses.dataclass
class QwenProcessor:
    """Tokenizer + Qwen2-VL image processor + the video processor's settings, doing what
    transformers' Qwen2_5_VLProcessor does: each `<|image_pad|>` / `<|video_pad|>` becomes
    t*h*w / merge^2 copies. Built from the saved files directly, so it works where
    transformers cannot construct the full processor (its video processor needs
    torchvision): frames go through `video.process_videos`, transformers' video processing
    written out in numpy."""

    tokenizer: Any
    image_processor: Any
    video_settings: VideoSettings | None = None
    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"

    @classmethod
    def load(cls, path: Path) -> QwenProcessor | None:
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = (
                AutoImageProcessor.from_pretrained(path)
                if (path / "preprocessor_config.json").exists()
                else None
            )
        return cls(tokenizer, image_processor, VideoSettings.load(path))

    @property
    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    def encode(
        self, prompts, images, chat_template: bool | None = None, videos=None
    ) -> dict[str, np.ndarray]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if videos is None:
            groups = images_per_prompt(images, len(prompts), _check_image)
            video_groups = None
        else:
            groups = images_per_prompt(images, len(prompts), _check_image, optional=True)
            video_groups, video_names = videos_per_prompt(videos, len(prompts))
        counts = [0] * len(prompts) if groups is None else [len(g) for g in groups]
        video_counts = (
            [0] * len(prompts) if video_groups is None else [len(g) for g in video_groups]
        )
        use_template = self.chat_template is not None if chat_template is None else chat_template
        if use_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [
                        {
                            "role": "user",
                            "content": [{"type": "image"}] * count
                            + [{"type": "video"}] * n_video
                            + [{"type": "text", "text": p}],
                        }
                    ],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p, count, n_video in zip(prompts, counts, video_counts)
            ]
        else:
            texts = prompts
        out: dict[str, np.ndarray] = {}
        if groups is not None and sum(counts):
            if self.image_processor is None:
                raise ValueError(
                    "this checkpoint has no image processor (preprocessor_config.json missing)"
                )
            rgb = [
                to_rgb(im, f"images[{i}]") if hasattr(im, "convert") else np.asarray(im)
                for i, group in enumerate(groups)
                for im in group
            ]
            try:
                pix = self.image_processor(images=rgb, return_tensors="np")
            except ValueError as e:  # e.g. an aspect ratio the processor refuses
                raise ValueError(f"the image processor refused an image: {e}") from None
            out["pixel_values"] = np.asarray(pix["pixel_values"], np.float32)
            out["image_grid_thw"] = np.asarray(pix["image_grid_thw"], np.int64)
            merge = self.image_processor.merge_size**2
            texts = _expand(texts, counts, self.image_token, out["image_grid_thw"], merge, "image")
        if video_groups is not None and sum(video_counts):
            settings = self.video_settings or VideoSettings()
            out.update(process_videos([v for g in video_groups for v in g], settings, video_names))
            texts = _expand(
                texts,
                video_counts,
                self.video_token,
                out["video_grid_thw"],
                settings.merge_size**2,
                "video",
            )
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, return_tensors="np", padding=True)
        out["input_ids"] = np.asarray(enc["input_ids"], np.int32)
        out["attention_mask"] = np.asarray(enc["attention_mask"], np.int32)
        return out

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _expand(
    texts: list[str], counts: list[int], token: str, grid: np.ndarray, merge: int, what: str
) -> list[str]:
    """Each `token` of each text becomes its item's t*h*w / merge copies, items in order."""
    tokens = iter((np.prod(grid, axis=-1) // merge).tolist())
    expanded = []
    for i, (text, count) in enumerate(zip(texts, counts)):
        if text.count(token) != count:
            raise ValueError(
                f"prompts[{i}] must contain the {what} token {token!r} once per {what} ({count}), "
                f"found {text.count(token)}"
            )
        pieces = text.split(token)
        expanded.append(pieces[0] + "".join(token * next(tokens) + rest for rest in pieces[1:]))
    return expanded


def _check_image(image, name: str) -> None:
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 4:
        raise ValueError(
            f"{name} looks like a video ([frames, height, width, channels]): pass videos with videos=, not images="
        )


def _is_frame(x: Any) -> bool:
    return hasattr(x, "convert") or getattr(x, "ndim", None) == 3


def _is_video(x: Any) -> bool:
    """One video: a Video, a 4-D array, or a non-empty list of frames (PIL images / 3-D arrays)."""
    if isinstance(x, Video):
        return True
    if isinstance(x, (list, tuple)):
        return bool(x) and all(_is_frame(f) for f in x)
    return getattr(x, "ndim", None) == 4


def videos_per_prompt(videos: Any, count: int) -> tuple[list[list[Any]], list[str]]:
    """`videos` for `count` prompts as one list of videos per prompt (reading order), and
    each video's name for errors ("videos[i]" or "videos[i][j]").

    Accepted: one video (one prompt); a list with one entry per prompt, each None (no
    video), a video, or a list of that prompt's videos. A video is a `zspa_jax.Video`, a
    list of frames (PIL images or [H, W, 3] arrays) or an array [T, H, W, 3].
    """
    if _is_video(videos):
        if count != 1:
            raise ValueError(
                f"got {count} prompts but one video; give videos as a list with one entry per prompt (a video, a list "
                "of videos, or None)"
            )
        return [[videos]], ["videos[0]"]
    if not isinstance(videos, (list, tuple)):
        raise TypeError(
            f"videos must be a video (zspa_jax.Video, a list of frames or an array [T, H, W, 3]) or a list with one "
            f"entry per prompt, got {type(videos).__name__}"
        )
    if len(videos) != count:
        raise ValueError(
            f"got {count} prompt(s) but {len(videos)} videos entries; give one entry per prompt: a video, a list of "
            "that prompt's videos, or None"
        )
    groups, names = [], []
    for i, entry in enumerate(videos):
        if entry is None:
            groups.append([])
        elif _is_video(entry):
            groups.append([entry])
            names.append(f"videos[{i}]")
        elif isinstance(entry, (list, tuple)):
            for j, v in enumerate(entry):
                if not _is_video(v):
                    raise ValueError(
                        f"videos[{i}][{j}] is not a video (a zspa_jax.Video, a list of frames or an array [T, H, W, 3]), "
                        f"got {type(v).__name__}"
                    )
            groups.append(list(entry))
            names += [f"videos[{i}][{j}]" for j in range(len(entry))]
        else:
            raise ValueError(
                f"videos[{i}] is not a video (a zspa_jax.Video, a list of frames or an array [T, H, W, 3]) or a list "
                f"of videos, got {type(entry).__name__}"
            )
    return groups, names
