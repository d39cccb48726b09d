"""`forward(vlm, input_ids, pixel_values, attention_mask=None) -> logits` for parity and scoring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llava import check_image_tokens
from zspa_jax.loading import VLM


def validate_inputs(vlm: VLM, input_ids, pixel_values, attention_mask) -> None:
    """Host-side checks with messages that name the argument and what was expected."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got {ids.dtype} {ids.shape}")
    if attention_mask is not None and np.shape(attention_mask) != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {np.shape(attention_mask)}")
    max_pos = vlm.config.text.max_position_embeddings
    if ids.shape[1] > max_pos:
        raise ValueError(f"input_ids has {ids.shape[1]} tokens; the model allows at most {max_pos} positions")
    if pixel_values is None:
        if np.any(ids == vlm.config.image_token_index):
            raise ValueError("input_ids holds image tokens but pixel_values is None")
        return
    vc = vlm.config.vision
    expected = (vc.num_channels, vc.image_size, vc.image_size)
    shape = tuple(np.shape(pixel_values))
    if len(shape) != 4 or shape[1:] != expected:
        raise ValueError(f"pixel_values must have shape [num_images, {', '.join(map(str, expected))}], got {shape}")
    check_image_tokens(ids, shape[0], vlm.tokens_per_image, vlm.config.image_token_index)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids, pixel_values, attention_mask):
    model = nnx.merge(graphdef, state)
    return model(input_ids, pixel_values, attention_mask)


def forward(vlm: VLM, input_ids, pixel_values=None, attention_mask=None) -> np.ndarray:
    """Logits of the whole sequence.

    Args:
      input_ids: int [B, L] with exactly `tokens_per_image` image tokens per image.
      pixel_values: float [M, C, H, W] (M images, in reading order across the batch) or None.
      attention_mask: [B, L], 0 on (left) padding; positions restart at each row's first token.
    Returns:
      f32 numpy [B, L, vocab].
    """
    validate_inputs(vlm, input_ids, pixel_values, attention_mask)
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    return np.asarray(_forward(vlm.graphdef, vlm.state, ids, pixels, mask))
