"""Host-side input handling: validation with clear errors, and strings + images -> arrays."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from zspa_jax.loading import VLM
from zspa_jax.pruning import PruneConfig


def is_traced(*arrays) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def validate_arrays(
    vlm: VLM, input_ids, pixel_values, attention_mask, prune: PruneConfig | None = None, extra_length: int = 0
) -> None:
    """Check shapes always, and values when concrete; messages name the argument.

    `extra_length` is the number of new tokens that will follow the prompt (generation).
    """
    shape = tuple(np.shape(input_ids))
    if len(shape) != 2 or not np.issubdtype(np.asarray(input_ids).dtype if not is_traced(input_ids) else input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got shape {shape}")
    if attention_mask is not None and tuple(np.shape(attention_mask)) != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got {tuple(np.shape(attention_mask))}")
    n = vlm.tokens_per_image
    if pixel_values is not None:
        vc = vlm.config.vision
        expected = (vc.num_channels, vc.image_size, vc.image_size)
        pshape = tuple(np.shape(pixel_values))
        if len(pshape) != 4 or pshape[1:] != expected:
            raise ValueError(
                f"pixel_values must have shape [num_images, {', '.join(map(str, expected))}] (NCHW), got {pshape}"
            )
        if prune is not None and pshape[0] != shape[0]:
            raise ValueError(
                f"pruning needs exactly one image per prompt: pixel_values holds {pshape[0]} image(s) "
                f"for {shape[0]} prompt(s)"
            )
    length = shape[1]
    if prune is not None and pixel_values is not None:
        keep = prune.num_keep(n)  # raises if keep > N
        length = length - n + keep
    max_pos = vlm.config.text.max_position_embeddings
    if length + extra_length > max_pos:
        raise ValueError(
            f"the prompt ({length} tokens after pruning) plus max_new_tokens ({extra_length}) needs "
            f"{length + extra_length} positions; the model allows at most {max_pos}"
        )
    if is_traced(input_ids, attention_mask):
        return
    ids = np.asarray(input_ids)
    is_image = ids == vlm.config.image_token_index
    if pixel_values is None:
        if is_image.any():
            raise ValueError("input_ids holds image tokens but pixel_values is None")
        return
    found, expected_count = int(is_image.sum()), np.shape(pixel_values)[0] * n
    if found != expected_count:
        raise ValueError(
            f"input_ids holds {found} image tokens (id {vlm.config.image_token_index}) but pixel_values holds "
            f"{np.shape(pixel_values)[0]} image(s) x {n} visual tokens = {expected_count}; each image needs "
            f"exactly {n} placeholders"
        )
    if prune is not None:
        for row, flags in enumerate(is_image):
            idx = np.flatnonzero(flags)
            if len(idx) != n or idx[-1] - idx[0] != n - 1:
                raise ValueError(
                    f"input_ids row {row}: pruning needs one contiguous span of {n} image tokens, "
                    f"found {len(idx)} image tokens" + ("" if len(idx) != n else " that are not contiguous")
                )
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if (mask[:, -1] == 0).any():
            raise ValueError("attention_mask must be left-padded: the last position of every row must be a real token")


def _apply_chat_template(processor, prompt: str, with_image: bool, image_token: str) -> str:
    """One user turn through the chat template, the image first.

    Multimodal templates take typed content parts; text-only templates (a LLaVA built on
    a text LLM's tokenizer) take a string, so the image token is put in front of the text.
    """
    import jinja2

    parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    try:
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        if not with_image or image_token in text:
            return text
    except (TypeError, jinja2.TemplateError):
        pass
    content = f"{image_token}\n{prompt}" if with_image else prompt
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(
    vlm: VLM, prompts: str | Sequence[str], images: Any | Sequence[Any] | None, chat_template: bool | None = None
) -> dict[str, np.ndarray]:
    """Strings + PIL images -> left-padded input_ids, attention_mask, pixel_values via the saved processor.

    With `chat_template` None, the processor's chat template is applied when it has one.
    Without a template, each prompt must contain the image token where the image goes.
    """
    if vlm.processor is None:
        raise ValueError(
            f"{vlm.path} has no saved processor/tokenizer, so prompts must be given as input_ids "
            "(convert a checkpoint that includes tokenizer and processor files)"
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompt(s) but {len(images)} image(s); give one image per prompt")
    processor = vlm.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", None) or "<image>"
    use_template = getattr(processor, "chat_template", None) is not None if chat_template is None else chat_template
    if use_template:
        prompts = [_apply_chat_template(processor, p, images is not None, image_token) for p in prompts]
    elif images is not None:
        for i, p in enumerate(prompts):
            count = p.count(image_token)
            if count != 1:
                raise ValueError(
                    f"prompts[{i}] must contain the image token {image_token!r} exactly once (found {count}); "
                    f"it marks where the image goes"
                )
    tokenizer.padding_side = "left"
    kwargs = dict(text=prompts, return_tensors="np", padding=True)
    if images is not None:
        kwargs["images"] = [img.convert("RGB") if hasattr(img, "convert") else img for img in images]
    batch = processor(**kwargs) if images is not None else tokenizer(prompts, return_tensors="np", padding=True)
    out = {"input_ids": np.asarray(batch["input_ids"], np.int32), "attention_mask": np.asarray(batch["attention_mask"], np.int32)}
    if images is not None:
        out["pixel_values"] = np.asarray(batch["pixel_values"], np.float32)
    return out
