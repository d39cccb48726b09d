"""The method record: what a pruning method needs and does, read by everything above it.

A method is one `Method` value in its own module, listed once in `zspa_jax.methods`.
`PruneConfig` validation, the families' support checks, `select_tokens`, the pipeline,
generation and `zspa_jax.estimate` read its capabilities and call its functions; none of
them compares method names. Three stages, by where the method reads the model:

  "embedding"  a function of the projected visual tokens (and the prompt);
  "tower"      reads the vision tower at the feature layer: `MethodInputs.visual` holds the
               N placeholders' tower features, `cls_attention` their [CLS] attention and
               `tower` the whole layer; merged tokens are in tower space (the pipeline
               projects them);
  both:        `select(inputs: MethodInputs, *, keep, core_ratio, batching) -> Selection`;
  "llm"        runs inside the decoder: layers before `PruneConfig.layer` see every token,
               the method chooses from what that layer sees, later layers and their KV cache
               hold only the kept tokens: `select(inputs: LayerInputs, *, keep) -> int32 [B, K]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from models.protocol import ClsTower

STAGES = ("embedding", "tower", "llm")


class MethodInputs(NamedTuple):
    """What an embedding-stage method may read (f32; masked entries may hold anything)."""

    visual: jax.Array  # [B, N, D] projected visual tokens
    valid: jax.Array | None  # bool [B, N]: real tokens (None: all real)
    prompt: jax.Array | None  # [B, T, D] raw input-embedding rows of the prompt
    prompt_mask: jax.Array | None  # bool [B, T]: which prompt rows count (None: all)
    rng: jax.Array | None  # PRNG key (methods with needs_rng)
    cls_attention: jax.Array | None  # [B, N] tower [CLS] attention (select_tokens' vispruner)
    grid: jax.Array | None  # int32 [B, 2]: (rows, cols) of each row's token grid (needs_grid)
    tower: ClsTower | None = None  # the tower's feature layer (tower stage, needs_tower)


class LayerInputs(NamedTuple):
    """What an LLM-stage method sees at its layer K (whole left-padded prompt, length L)."""

    hidden: jax.Array  # [B, L, D] hidden states entering layer K (output of layer K-1)
    attention_row: jax.Array  # f32 [B, L]: layer K-1's last-query attention, head mean
    keys: jax.Array  # [B, L, Hkv, Dh]: layer K-1's keys after RoPE
    norm_weight: jax.Array  # [D]: the decoder's final RMSNorm scale
    visual_index: (
        jax.Array
    )  # int32 [B, N]: each row's placeholder positions, ascending (its images in order)
    visual_valid: jax.Array | None  # bool [B, N]: real placeholders (None: all)
    text_mask: jax.Array  # bool [B, L]: real text tokens after the last image (the question)
    num_visual: int  # N (static)


class Selection(NamedTuple):
    kept: jax.Array  # int32 [B, K]: kept indices into the N tokens, or the slots merged tokens take
    tokens: jax.Array | None = None  # [B, K, D] replacement tokens when the method merges
    # int32 [B, K] (merging methods): 0 for a token that is an input token at its own slot,
    # 1, 2, ... for each class of new token (VisionZip: 1 = [CLS], 2 = contextual); None: all 0
    kind: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning method. `flops(n, d, keep, text_tokens, core_ratio, tower_width,
    key_dim) -> int` counts its own selection work (2 per multiply-add), for estimate."""

    name: str
    stage: str
    select: Callable[..., Any]
    flops: Callable[..., int]
    summary: str
    citation: str = ""
    needs_prompt: bool = False
    needs_rng: bool = False
    needs_grid: bool = False  # reads the 2-D token grid (families with grid_tokens)
    accepts_mask: bool = True  # rows may carry fewer real tokens than N (a valid mask)
    merges: bool = False  # returns new tokens (plus the slots they take), not a subset
    uses_core_ratio: bool = False  # reads PruneConfig.core_ratio (and accepts "auto")
    keeps_positions: bool = False  # kept tokens always keep their original positions
    # Host-side check of the batch's token grids (int [B, 2], rows x cols) for `keep`,
    # before anything compiles (needs_grid methods): check_layout(grid, keep) raises ValueError.
    check_layout: Callable[..., None] | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(
                f"Method {self.name!r}: stage must be one of {STAGES}, got {self.stage!r}"
            )

    @property
    def needs_cls_attention(self) -> bool:
        return self.stage == "tower"

    @property
    def needs_tower(self) -> bool:
        """Reads the whole tower layer (not just [CLS] attention): only through the pipeline."""
        return self.stage == "tower" and self.merges

    @property
    def llm_layer(self) -> bool:
        """Runs inside the decoder at PruneConfig.layer."""
        return self.stage == "llm"


def no_flops(*args, **kwargs) -> int:
    """Methods whose selection costs nothing worth counting (a constant or one top-k)."""
    return 0
