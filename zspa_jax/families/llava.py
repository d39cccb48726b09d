"""The LLaVA-1.5 family: CLIP tower -> MLP projector -> LLaMA (models/llava.py, convert/llava.py).

Host side: a fixed number of visual tokens per image (N = patches, plus [CLS] under the
"full" strategy), NCHW pixel_values, no aux arrays; the array path is traceable, so
`generate_tokens` runs inside a caller's `jax.jit`. Strings + images go through the saved
transformers processor (`LlavaProcessor`) and the chat template.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from models.checkpoint import RECONVERT, CheckpointError
from models.llava import LlavaConfig, LlavaForConditionalGeneration
from zspa_jax.estimate.llava import HOOKS as ESTIMATE_HOOKS
from zspa_jax.families.base import (
    Family,
    HostBatch,
    images_per_prompt,
    left_pad,
    pad_visual_slots,
    to_rgb,
)
from zspa_jax.pruning import PruneConfig
from zspa_jax.validation import (
    as_array,
    check_binary_mask,
    check_bool,
    check_finite,
    check_ids_in_range,
    is_traced,
    type_name,
)

__all__ = ["FAMILY", "LlavaAdapter", "check_arrays", "encode"]


class CheckedArrays(NamedTuple):
    input_ids: Any  # int [B, L]
    pixel_values: Any | None  # float [M, C, H, W]
    attention_mask: Any | None  # [B, L] of 0/1


def check_arrays(
    vlm,
    input_ids,
    pixel_values,
    attention_mask,
    prune: PruneConfig | None = None,
    extra_length: int = 0,
) -> CheckedArrays:
    """Check the array API's inputs; messages name the argument and, for values, the row.

    Shapes and dtypes are always checked; values (finite pixels, ids within the
    vocabulary, 0/1 masks, placeholder counts) when the arrays are concrete.
    `extra_length` is the number of new tokens that will follow the prompt (generation).
    Returns the arrays (host values as NumPy; JAX arrays and tracers untouched).
    """
    ids = as_array("input_ids", input_ids, "integer", 2, "an int array [batch, length]")
    shape = tuple(ids.shape)
    mask = None
    if attention_mask is not None:
        mask = attention_mask if hasattr(attention_mask, "dtype") else np.asarray(attention_mask)
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {shape}, got {tuple(mask.shape)}"
            )
        if not (np.issubdtype(np.dtype(mask.dtype), np.number) or np.dtype(mask.dtype) == np.bool_):
            raise TypeError(
                f"attention_mask must be an array of 0/1 (int or bool), got dtype {mask.dtype}"
            )
    n = vlm.tokens_per_image
    pixels = None
    if pixel_values is not None:
        vc = vlm.config.vision
        expected = (vc.num_channels, vc.image_size, vc.image_size)
        layout = f"a float array [num_images, {', '.join(map(str, expected))}] (NCHW)"
        pixels = as_array("pixel_values", pixel_values, "floating", 4, layout)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be {layout}, got shape {tuple(pixels.shape)}")
    if is_traced(ids, mask, pixels):
        _check_length(vlm, prune, ids, mask, pixels, extra_length)
        return CheckedArrays(ids, pixels, mask)

    check_ids_in_range(
        "input_ids", ids, vlm.config.text.vocab_size, allowed=(vlm.config.image_token_index,)
    )
    if mask is not None:
        check_binary_mask("attention_mask", mask)
        if (np.asarray(mask)[:, -1] == 0).any():
            raise ValueError(
                "attention_mask must be left-padded: the last position of every row must be a real token"
            )
    host_ids = np.asarray(ids)
    is_image = host_ids == vlm.config.image_token_index
    if pixels is None:
        if is_image.any():
            raise ValueError("input_ids holds image tokens but pixel_values is None")
        _check_length(vlm, prune, ids, mask, pixels, extra_length)
        return CheckedArrays(ids, pixels, mask)
    check_finite("pixel_values", pixels, what="image")
    found, expected_count = int(is_image.sum()), pixels.shape[0] * n
    if found != expected_count:
        raise ValueError(
            f"input_ids holds {found} image tokens (id {vlm.config.image_token_index}) but pixel_values holds "
            f"{pixels.shape[0]} image(s) x {n} visual tokens = {expected_count}; each image needs "
            f"exactly {n} placeholders"
        )
    _check_length(vlm, prune, ids, mask, pixels, extra_length)
    return CheckedArrays(ids, pixels, mask)


def _check_length(vlm, prune, ids, mask, pixels, extra_length: int) -> None:
    """The (pruned) prompt plus the new tokens must fit the model's positions."""
    length = ids.shape[1]
    if prune is not None and pixels is not None:
        length -= _pruned_away(vlm, prune, ids, mask, pixels)
    max_pos = vlm.config.text.max_position_embeddings
    if length + extra_length > max_pos:
        raise ValueError(
            f"the prompt ({length} tokens after pruning) plus max_new_tokens ({extra_length}) needs "
            f"{length + extra_length} positions; the model allows at most {max_pos}"
        )


def images_per_row(vlm, ids, mask, pixels) -> np.ndarray:
    """int [B]: images in each row when pruning. Traced arrays need the same count in every
    row (pixel_values [B * I, ...]); concrete rows need whole spans of N placeholders each."""
    n = vlm.tokens_per_image
    rows = ids.shape[0]
    if is_traced(ids, mask, pixels):
        images, rest = divmod(pixels.shape[0], rows)
        if rest or not images:
            raise ValueError(
                f"pruning traced arrays needs the same number of images in every prompt: pixel_values holds "
                f"{pixels.shape[0]} image(s) for {rows} prompt(s); pass concrete arrays to mix image counts"
            )
        return np.full(rows, images)
    per_row = (np.asarray(ids) == vlm.config.image_token_index).sum(axis=1)
    for row, count in enumerate(per_row.tolist()):
        if count == 0 or count % n:
            raise ValueError(
                f"input_ids row {row}: pruning needs each prompt's images as whole spans of {n} placeholders, "
                f"found {count} image tokens"
            )
    return per_row // n


def _pad_images(pixels: np.ndarray, images: np.ndarray) -> np.ndarray:
    """[sum(images), C, H, W] -> [B * max(images), C, H, W]: each row's images, then blank
    ones (their placeholders are masked; no method can keep them)."""
    most = int(images.max())
    out = np.zeros((len(images) * most,) + pixels.shape[1:], pixels.dtype)
    starts = np.cumsum(np.concatenate([[0], images[:-1]]))
    for row, (start, count) in enumerate(zip(starts.tolist(), images.tolist())):
        out[row * most : row * most + count] = pixels[start : start + count]
    return out


def _pruned_away(vlm, prune: PruneConfig, ids, mask, pixels) -> int:
    """Prompt tokens pruning removes from the longest row's positions (0 inside the LLM:
    kept tokens keep their positions and decoding continues after the whole prompt)."""
    n = vlm.tokens_per_image
    images = images_per_row(vlm, ids, mask, pixels)
    keep = prune.row_keep(
        int(images.min()) * n, n, int(images.max())
    )  # raises if keep > a row's tokens
    return 0 if prune.record.llm_layer else int(images.min()) * n - keep


# --------------------------------------------------------------------------- strings + images


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


class LlavaAdapter:
    """Fixed N per image, NCHW pixels, no aux; traced arrays pass through untouched."""

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
        arrays = check_arrays(
            vlm, input_ids, pixel_values, attention_mask, prune, extra_length=extra_length
        )
        input_ids, pixel_values, attention_mask = (
            arrays.input_ids,
            arrays.pixel_values,
            arrays.attention_mask,
        )
        if pixel_values is None:
            n_row = images = None
        else:
            n = vlm.tokens_per_image
            images = (
                images_per_row(vlm, input_ids, attention_mask, pixel_values)
                if prune is not None
                else None
            )
            n_row = n * (int(images.max()) if images is not None else 1)
        prompt_tokens = None
        if not is_traced(input_ids, attention_mask):
            ids = np.asarray(input_ids, np.int32)
            mask = (
                np.ones(ids.shape, np.int32)
                if attention_mask is None
                else np.asarray(attention_mask, np.int32)
            )
            prompt_tokens = mask.sum(axis=1)
            if (
                images is not None and images.min() != images.max()
            ):  # the visual layout: I images in every row
                pixel_values = _pad_images(np.asarray(pixel_values), images)
                ids, mask = pad_visual_slots(
                    ids, mask, vlm.config.image_token_index, n_row, vlm.pad_token_id
                )
                input_ids, attention_mask = ids, mask
            if prompt_bucket:
                dropped = 0
                if images is not None and not prune.record.llm_layer:
                    dropped = n_row - prune.row_keep(int(images.min()) * n, n, int(images.max()))
                input_ids, attention_mask = left_pad(
                    ids, mask, prompt_bucket, vlm.pad_token_id, dropped
                )
        if pixel_values is None:
            return HostBatch(input_ids, attention_mask, None, None, 0, 0, prompt_tokens)
        rows = int(np.shape(input_ids)[0])
        grid = vlm.config.token_grid
        per_image = int(images.max()) if images is not None else 1
        grid = None if grid is None else np.tile(np.asarray(grid, np.int32), (rows, per_image, 1))
        per_row = None if images is None else images * n
        return HostBatch(
            input_ids,
            attention_mask,
            pixel_values,
            None,
            n_row,
            n if per_row is None else int(per_row.min()),
            prompt_tokens,
            per_row,
            image_grid=grid,
            images_per_row=images,
            min_image_visual=n,
        )

    def last_row_arrays(self, vlm, ids: np.ndarray, extras) -> dict[str, int]:
        return {
            "pixel_values": int((ids[-1] == vlm.config.image_token_id).sum())
            // vlm.config.image_seq_length
        }

    def encode(self, vlm, prompts, images, chat_template, videos=None):
        if videos is not None:
            raise ValueError(
                "videos were given: video input is not supported by LLaVA models (images only)"
            )
        return encode(vlm, prompts, images, chat_template=chat_template)

    def load_processor(self, path: Path):
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
                reason = (
                    str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                )
                raise CheckpointError(
                    f"{path}: the saved tokenizer/processor files cannot be loaded ({reason}); {RECONVERT}"
                ) from None


FAMILY = Family(
    name="llava",
    display_name="LLaVA",
    config_cls=LlavaConfig,
    model_cls=LlavaForConditionalGeneration,
    adapter=LlavaAdapter(),
    converter="convert.llava",
    has_cls=True,
    variable_tokens=False,
    tokens_per_image=lambda cfg: cfg.image_seq_length,
    estimate=ESTIMATE_HOOKS,
)
