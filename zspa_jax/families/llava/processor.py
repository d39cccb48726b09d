"""LLaVA's strings + images -> arrays, through the saved transformers processor and the chat
template (`LlavaProcessor`; LLaVA-NeXT's `LlavaNextProcessor` takes the same path)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import RECONVERT, CheckpointError
from zspa_jax.families.images import images_per_prompt, to_rgb
from zspa_jax.validation import check_bool, type_name

__all__ = ["encode", "load_processor"]


def _image_parts(prompt: str, images: int, image_token: str) -> list[dict]:
    """Typed chat content: the text around the user's image tokens, each image where its token
    stood (all first when the prompt has none)."""
    if image_token not in prompt:
        return [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    pieces = prompt.split(image_token)
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        text = (
            piece.strip()
            if 0 < i < len(pieces) - 1
            else (piece.rstrip() if i == 0 else piece.lstrip())
        )
        if text:
            parts.append({"type": "text", "text": text})
        if i < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


def _apply_chat_template(processor, prompt: str, images: int, image_token: str) -> str:
    """One user turn through the chat template, each image where the prompt put its image
    token (or all first).

    Multimodal templates take typed content parts; text-only templates (a LLaVA built on
    a text LLM's tokenizer) take a string, so the image tokens are put in the text.
    """
    import jinja2

    parts = (
        _image_parts(prompt, images, image_token) if images else [{"type": "text", "text": prompt}]
    )
    try:
        text = processor.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True
        )
        if text.count(image_token) == images:
            return text
    except (TypeError, jinja2.TemplateError):
        pass
    content = (
        prompt if image_token in prompt or not images else f"{image_token}\n" * images + prompt
    )
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str or a list of str, got {type_name(prompts)}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type_name(p)} {p!r}"[:200])
    return list(prompts)


def _check_image(img: Any, name: str) -> None:
    if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
        return
    if isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[-1] in (1, 3, 4) and img.size:
        if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
            raise ValueError(f"{name} holds NaN or Inf values; every value must be finite")
        return
    hint = (
        " (open files with PIL.Image.open(path))"
        if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__")
        else ""
    )
    raise TypeError(
        f"{name} must be a PIL.Image.Image or an [height, width, channels] array, got "
        f"{type_name(img)}{' of shape ' + str(img.shape) if isinstance(img, np.ndarray) else ''}{hint}"
    )


def encode(
    vlm,
    prompts: str | Sequence[str],
    images: Any | Sequence[Any] | None = None,
    *,
    chat_template: bool | None = None,
) -> dict[str, np.ndarray]:
    """Strings + images -> exactly the arrays the array API takes, through the saved HF processor.

        batch = zspa_jax.encode(vlm, ["What is on the table?"], [image])
        logits = zspa_jax.forward(vlm, **batch)                 # input_ids, pixel_values, attention_mask
        out = zspa_jax.generate_tokens(vlm, **batch, max_new_tokens=16)

    Returns a dict of NumPy arrays: input_ids int32 [B, L] and attention_mask int32 [B, L]
    (left-padded), plus pixel_values f32 [M, C, H, W] (all images, in reading order) when
    images are given: one entry per prompt, an image or a list of the prompt's images.

    The image token (e.g. "<image>") is optional in a prompt: where it appears, an image
    goes there (one token per image); otherwise the images go first. With
    `chat_template` None the processor's chat template is applied when it has one.
    """
    check_bool("chat_template", chat_template, allow_none=True)
    if vlm.processor is None:
        raise ValueError(
            f"{vlm.path} has no saved processor/tokenizer, so prompts must be given as input_ids "
            "(convert a checkpoint that includes tokenizer and processor files)"
        )
    prompts = _check_prompts(prompts)
    images = images_per_prompt(images, len(prompts), _check_image)
    processor = vlm.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", None) or "<image>"
    counts = [0] * len(prompts) if images is None else [len(group) for group in images]
    for i, (p, count) in enumerate(zip(prompts, counts)):
        if p.count(image_token) not in (0, count):
            raise ValueError(
                f"prompts[{i}] contains the image token {image_token!r} {p.count(image_token)} times for {count} "
                "image(s); put one token where each image goes, or none (images first)"
            )
    has_template = getattr(processor, "chat_template", None) is not None
    if chat_template and not has_template:
        raise ValueError(
            f"chat_template=True, but the processor saved at {vlm.path} has no chat template"
        )
    use_template = has_template if chat_template is None else chat_template
    if use_template:
        prompts = [
            _apply_chat_template(processor, p, count, image_token)
            for p, count in zip(prompts, counts)
        ]
    elif images is not None:
        prompts = [
            p if image_token in p else f"{image_token}\n" * count + p
            for p, count in zip(prompts, counts)
        ]
    tokenizer.padding_side = "left"
    if images is not None:
        rgb = [
            to_rgb(img, f"images[{i}][{j}]")
            for i, group in enumerate(images)
            for j, img in enumerate(group)
        ]
        batch = processor(text=prompts, images=rgb, return_tensors="np", padding=True)
    else:
        batch = tokenizer(prompts, return_tensors="np", padding=True)
    out = {"input_ids": np.asarray(batch["input_ids"], np.int32)}
    if images is not None:
        out["pixel_values"] = np.asarray(batch["pixel_values"], np.float32)
        if "image_sizes" in batch:  # anyres processors (LLaVA-NeXT)
            out["image_sizes"] = np.asarray(batch["image_sizes"], np.int64)
    out["attention_mask"] = np.asarray(batch["attention_mask"], np.int32)
    return out


def load_processor(path: Path):
    """The transformers processor saved beside the params, or None when there is none."""
    if not any(
        (path / name).exists()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoProcessor.from_pretrained(path)
        except Exception as e:  # transformers raises many types for one cause: damaged files
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: the saved tokenizer/processor files cannot be loaded ({reason}); {RECONVERT}"
            ) from None
