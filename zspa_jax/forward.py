"""`forward(vlm, input_ids, pixel_values, attention_mask=None, prune=None) -> logits`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import padding_causal_mask

from zspa_jax.inputs import check_arrays
from zspa_jax.validation import check_bool, check_int
from zspa_jax.loading import VLM
from zspa_jax.methods import fastv
from zspa_jax.pipeline import decoder_inputs
from zspa_jax.pruning import PruneConfig


@functools.partial(jax.jit, static_argnames=("graphdef", "prune", "special_ids", "keep_positions"))
def _forward(graphdef, params, input_ids, pixel_values, attention_mask, rng, prune, special_ids, keep_positions):
    model = nnx.merge(graphdef, params)
    inputs = decoder_inputs(model, input_ids, pixel_values, attention_mask, prune, special_ids, rng, keep_positions)
    if prune is not None and prune.method == "fastv" and pixel_values is not None:
        n = model.config.image_seq_length
        out = fastv.prefill(
            model.language_model.model, inputs.embeds, inputs.positions, inputs.mask, input_ids,
            model.config.image_token_index, n, prune.num_keep(n), prune.fastv_layer,
        )
        return model.language_model.logits(out.hidden), out.kept
    hidden, _ = model.language_model.model(inputs.embeds, inputs.positions, padding_causal_mask(inputs.mask))
    return model.language_model.logits(hidden), inputs.kept_indices


def forward(
    vlm: VLM,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    prune: PruneConfig | None = None,
    *,
    seed: int = 0,
    keep_positions: bool = False,
    return_kept: bool = False,
):
    """Logits over the whole (possibly pruned) sequence, for parity checks and scoring.

    Args:
      input_ids: int [B, L], `tokens_per_image` image tokens per image, left-padded.
      pixel_values: float [M, C, H, W] (images in reading order across the batch) or None.
      attention_mask: [B, L], 0 on left padding; positions restart at each row's first token.
      prune: a PruneConfig (one image per row); the kept tokens replace the placeholders
        ("fastv": from layer `prune.fastv_layer` on; its early layers see all tokens).
      seed: rng seed for method="random".
      return_kept: also return the kept indices int32 [B, K] (None without pruning).
    Returns:
      f32 numpy [B, L', vocab] with L' = L - N + K when pruning (else L).
    """
    arrays = check_arrays(vlm, input_ids, pixel_values, attention_mask, prune)
    seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
    check_bool("keep_positions", keep_positions)
    check_bool("return_kept", return_kept)
    ids = jnp.asarray(arrays.input_ids, jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32) if arrays.attention_mask is None else jnp.asarray(arrays.attention_mask, jnp.int32)
    pixels = None if arrays.pixel_values is None else jnp.asarray(arrays.pixel_values, jnp.float32)
    logits, kept = _forward(
        vlm.graphdef, vlm.state, ids, pixels, mask, jax.random.key(seed), prune, vlm.special_token_ids, bool(keep_positions)
    )
    logits = np.asarray(logits)
    if return_kept:
        return logits, None if kept is None else np.asarray(kept)
    return logits
