"""What every model family exposes to the code above models/ (pipeline, generation).

A family's model module has `config` (with `image_token_id` and `text`), a
`language_model` (`models.llama.LlamaForCausalLM`: the decoder with its KV cache and
the logits head, shared by all families) and

    multimodal_inputs(input_ids, pixel_values, attention_mask, aux) -> MultimodalInputs

which embeds the text, runs the vision tower and writes the visual tokens into the
placeholder positions. `aux` is the family's pytree of host-computed index arrays (None
for LLaVA; grid layouts and 3-D positions for Qwen2.5-VL), built by the family's host
adapter in `zspa_jax.families`.

A family whose tower has a [CLS] token also exposes, for the tower-stage methods
(VisPruner, VisionZip),

    cls_feature_index() -> int                   # the tower hidden state read; a ValueError
                                                 # saying why when the tower cannot serve
    cls_tower(pixel_values, aux) -> TowerFeatures
    project_tower_features(x [B, K, Dv]) -> [B, K, D]   # the projector

Models know nothing about pruning: no method name or option reaches them (the family
record checks a method's needs against the model and names the method).

A tower-stage method runs on each tower row (one tower input: an image, or one crop of an
image) and keeps K of its P tokens. `TowerFeatures.layout` says where the kept tokens go in
the batch rows; None means the trivial layout: a row's tower rows are its I images in
reading order, tower token j of its i-th image is placeholder slot i * P + j.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class MultimodalInputs(NamedTuple):
    embeds: jax.Array  # [B, L, D]: text embeddings with the visual tokens written in
    text_embeds: jax.Array  # [B, L, D]: raw input-embedding rows (what the prompt vector averages)
    positions: jax.Array  # int32 [B, L] (1-D RoPE) or [3, B, L] (M-RoPE, kept as is when pruning)
    next_position: jax.Array | None  # int32 [B]: first decode position; None = max(positions) + 1
    # The visual layout, for pruning (None where the batch is not laid out for it). Every
    # row has the same number N of placeholder slots (a row with fewer real visual tokens
    # carries masked slots after its last real one); slot i is the row's i-th placeholder
    # in sequence order, so the row's images follow each other in reading order.
    visual: jax.Array | None  # [B, N, D]: each row's visual tokens, slot by slot
    visual_valid: jax.Array | None  # bool [B, N]: real tokens of `visual` (None: all real)
    # int32 [B, I, n]: each image's (or video's) slots in [0, N), -1 padding
    image_index: jax.Array | None = None
    # int32 [B, I, 2]: each image's token grid (rows, cols), row-major
    image_grid: jax.Array | None = None


class ClsTower(NamedTuple):
    """A tower's feature layer with its [CLS] token (what VisionZip merges from)."""

    hidden: jax.Array  # [B, 1 + P, Dv] hidden state, [CLS] at 0
    probs: jax.Array  # [B, 1 + P] the [CLS] query's attention, head mean
    keys: jax.Array  # [B, 1 + P, Dh] the layer's keys, head mean
    cls_in_placeholders: bool  # True when the N placeholders hold [CLS] + P


class TowerLayout(NamedTuple):
    """Where the kept tokens of M tower rows go, B batch rows of R = M / B tower rows each
    (batch row b's are tower rows b * R .. b * R + R - 1).

    Tower rows that form one map (e.g. an image's crop grid) share a `start`; the kept
    tokens of a map sit together at that slot, maps in ascending `start`. Within a map,
    entries keep the method's order (a map of one tower row, `interleave` False), or
    (`interleave` True) the kept tower tokens of all its tower rows are read in `order`, and
    the new tokens of merging methods follow them, by kind, then tower row, then the
    method's order. Kept tokens of a tower row whose `slot` is -1 (a padding row) are
    never real: their entries are masked out.
    """

    slot: jax.Array  # int32 [M, P]: the placeholder slot in [0, N) whose position each tower token takes; -1: padding row
    # int32 [M, P]: reading order of the tokens within their map (interleaved maps)
    order: jax.Array
    start: jax.Array  # int32 [M]: the slot where the tower row's map begins (its entries sit there)
    interleave: jax.Array  # bool [M]: the tower row's map is read in `order` across its tower rows
    num_slots: int  # N: placeholder slots per batch row (static)


class TowerFeatures(NamedTuple):
    # [M, P, Dv] the tower features of each tower row's P tokens (before the projector)
    features: jax.Array
    cls_attention: jax.Array  # [M, P] the [CLS] query's attention to each of them
    layer: ClsTower  # the whole feature layer
    # None: tower rows are images, P placeholder slots each, in order
    layout: TowerLayout | None = None
