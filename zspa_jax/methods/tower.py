"""Methods that read the vision tower's [CLS] attention: VisPruner and VisionZip in the pipeline.

Both take the tower's hidden state at LLaVA's (single) vision feature layer and the
[CLS] attention row of the encoder layer that produced it (transformers'
`attentions[feature_layer]`), as the official code does with `select_layer = -2`.
Towers without a [CLS] token (e.g. Qwen2.5-VL's, SigLIP) are refused with a ValueError.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zspa_jax.methods.visionzip import visionzip_merge
from zspa_jax.methods.vispruner import vispruner_select

__all__ = ["TowerPruning", "check_cls_tower", "tower_prune"]


class TowerPruning(NamedTuple):
    visual: jax.Array | None  # [B, N, D_text] all projected visual tokens (subset methods), else None
    kept: jax.Array  # int32 [B, K]: kept indices (vispruner) or the slots merged tokens take (visionzip)
    tokens: jax.Array | None  # [B, K, D_text] replacement tokens (visionzip), else None


def check_cls_tower(model, method: str) -> int:
    """Validate that `model` can give `method` its [CLS] attention; returns the feature hidden-state index."""
    tower = model.vision_tower
    if not getattr(tower, "has_cls_token", False):
        raise ValueError(
            f"method {method!r} needs the vision tower's [CLS] attention, but this tower "
            f"({type(tower).__name__}) has no [CLS] token"
        )
    cfg = model.config
    layers = cfg.feature_layers
    if len(layers) != 1:
        raise ValueError(
            f"method {method!r} reads the [CLS] attention at the vision feature layer, but this model "
            f"concatenates several feature layers {layers}"
        )
    index = layers[0] % (cfg.vision.num_hidden_layers + 1)
    if index == 0:
        raise ValueError(
            f"method {method!r} needs the [CLS] attention of the layer that produces the features, but "
            "vision_feature_layer selects the embeddings (hidden state 0), which no attention layer produced"
        )
    return index


def tower_prune(model, pixel_values: jax.Array, method: str, keep: int, batching: str) -> TowerPruning:
    """Run the tower once and prune with `method` ("vispruner" | "visionzip").

    pixel_values [B, C, H, W] (one image per row) -> TowerPruning for the N placeholders
    (N = P patches under the "default" strategy, 1 + P under "full").
    """
    index = check_cls_tower(model, method)
    states, cls = model.vision_tower.hidden_states(pixel_values, num_layers=index, cls_attention_layer=index - 1)
    hidden = states[index]  # [B, 1 + P, Dv], [CLS] at 0
    full = model.config.vision_feature_select_strategy == "full"
    projector = model.multi_modal_projector
    if method == "vispruner":
        features = hidden if full else hidden[:, 1:]
        attention = cls.probs if full else cls.probs[:, 1:]
        kept = vispruner_select(features, attention, keep=keep, batching=batching)
        return TowerPruning(projector(features), kept, None)
    if method == "visionzip":
        merged, slots = visionzip_merge(hidden, cls.probs, cls.keys, keep=keep, cls_in_placeholders=full, batching=batching)
        return TowerPruning(None, slots, projector(merged.astype(hidden.dtype)))
    raise ValueError(f"tower_prune handles 'vispruner' and 'visionzip', got {method!r}")


def place_span_tokens(embeds: jax.Array, input_ids: jax.Array, image_token_index: int, tokens: jax.Array) -> jax.Array:
    """Write tokens [B, K, D] over the pruned row's visual span [s_b, s_b + K) of embeds [B, L', D].

    s_b is the first image placeholder of row b in the unpruned `input_ids` (the span start
    is the same before and after pruning, since only the span shrinks).
    """
    keep = tokens.shape[1]
    start = jnp.argmax(input_ids == image_token_index, axis=1)[:, None]
    j = jnp.arange(embeds.shape[1])[None, :]
    in_span = (j >= start) & (j < start + keep)
    picked = jnp.take_along_axis(tokens, jnp.clip(j - start, 0, keep - 1)[..., None], axis=1)
    return jnp.where(in_span[..., None], picked.astype(embeds.dtype), embeds)
