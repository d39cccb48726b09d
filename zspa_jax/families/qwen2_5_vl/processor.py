"""Qwen2.5-VL's strings + images -> arrays: the saved tokenizer, chat template and Qwen2-VL
image processor, doing what transformers' Qwen2_5_VLProcessor does for images."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from zspa_jax.families.base import images_per_prompt, to_rgb

__all__ = ["QwenProcessor"]


@dataclasses.dataclass
class QwenProcessor:
    """Tokenizer + Qwen2-VL image processor, doing what transformers' Qwen2_5_VLProcessor
    does for images: each `<|image_pad|>` becomes t*h*w / merge^2 copies. Built from the
    saved files directly, so it works where transformers cannot construct the full
    processor (its video processor needs torchvision)."""

    tokenizer: Any
    image_processor: Any
    image_token: str = "<|image_pad|>"

    @classmethod
    def load(cls, path: Path) -> "QwenProcessor | None":
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = AutoImageProcessor.from_pretrained(path) if (path / "preprocessor_config.json").exists() else None
        return cls(tokenizer, image_processor)

    @property
    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    def encode(self, prompts, images, chat_template: bool | None = None) -> dict[str, np.ndarray]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        groups = images_per_prompt(images, len(prompts), _check_image)
        counts = [0] * len(prompts) if groups is None else [len(g) for g in groups]
        use_template = self.chat_template is not None if chat_template is None else chat_template
        if use_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p, count in zip(prompts, counts)
            ]
        else:
            texts = prompts
        out: dict[str, np.ndarray] = {}
        if groups is not None:
            if self.image_processor is None:
                raise ValueError("this checkpoint has no image processor (preprocessor_config.json missing)")
            rgb = [
                to_rgb(im, f"images[{i}]") if hasattr(im, "convert") else np.asarray(im)
                for i, group in enumerate(groups) for im in group
            ]
            try:
                pix = self.image_processor(images=rgb, return_tensors="np")
            except ValueError as e:  # e.g. an aspect ratio the processor refuses
                raise ValueError(f"the image processor refused an image: {e}") from None
            out["pixel_values"] = np.asarray(pix["pixel_values"], np.float32)
            out["image_grid_thw"] = np.asarray(pix["image_grid_thw"], np.int64)
            merge = self.image_processor.merge_size**2
            tokens = iter((np.prod(out["image_grid_thw"], axis=-1) // merge).tolist())
            expanded = []
            for i, (text, count) in enumerate(zip(texts, counts)):
                if text.count(self.image_token) != count:
                    raise ValueError(
                        f"prompts[{i}] must contain the image token {self.image_token!r} once per image ({count}), "
                        f"found {text.count(self.image_token)}"
                    )
                pieces = text.split(self.image_token)
                expanded.append(pieces[0] + "".join(self.image_token * next(tokens) + rest for rest in pieces[1:]))
            texts = expanded
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, return_tensors="np", padding=True)
        out["input_ids"] = np.asarray(enc["input_ids"], np.int32)
        out["attention_mask"] = np.asarray(enc["attention_mask"], np.int32)
        return out

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _check_image(image, name: str) -> None:
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 4:
        raise ValueError(f"{name} looks like a video ([frames, height, width, channels]): video input is not supported")
