"""Qwen3-VL in Flax NNX: ViT with a learned position table -> patch merger and DeepStack
mergers -> Qwen3 decoder with QK-norm, interleaved M-RoPE and DeepStack.

Follows transformers' `modeling_qwen3_vl.py`. Like Qwen2.5-VL's (`models.qwen2_5_vl`),
the tower works on the processors' flattened patches `[P, C * T * p * p]` (all images and
videos of a batch concatenated, merge blocks of spatial_merge_size^2 consecutive rows) and
their grids `[n, 3]` of (t, h, w). Unlike it, the tower has no windows: every block
attends within one temporal patch of one item (transformers' cu_seqlens), the patch
embedding has a bias, a learned position table (num_position_embeddings = side^2 entries)
is resampled bilinearly to each grid and added to the patch embeddings, the blocks use
LayerNorm and a plain (non-gated) MLP, and DeepStack mergers turn the hidden states after
the blocks of `deepstack_visual_indexes` into extra visual tokens, one level per index,
which the decoder adds to the hidden states at the visual positions after its layers
0, 1, 2, ... (`models.llama.DeepStackInput`).

Everything that depends on the grid values (rotary positions, position-table taps,
attention segments) is computed on the host in numpy by `vision_layout`, so the jitted
tower only sees arrays of static shape. The language model is
`models.llama.LlamaForCausalLM` with `qk_norm` and `mrope_interleaved`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import llama
from models.layers import (
    ACTIVATIONS,
    activation,
    check_choice,
    check_positive,
    dtype_of,
    padding_causal_mask,
    prefixed_rules,
)
from models.llama import DeepStackInput, LlamaConfig, LlamaForCausalLM
from models.qwen2_5_vl import VisionAttention, axial_rotary

VISION_NORM_EPS = 1e-6  # hard-coded in transformers' vision blocks and mergers


@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    dtype: str = "float32"

    def __post_init__(self):
        name = type(self).__name__
        check_positive(
            name,
            depth=self.depth,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            spatial_merge_size=self.spatial_merge_size,
            out_hidden_size=self.out_hidden_size,
            num_position_embeddings=self.num_position_embeddings,
        )
        indexes = tuple(int(i) for i in self.deepstack_visual_indexes)
        object.__setattr__(self, "deepstack_visual_indexes", indexes)
        bad = [i for i in indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"{name}.deepstack_visual_indexes {bad} out of range for depth {self.depth}"
            )
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"{name}.deepstack_visual_indexes {list(indexes)} has duplicates")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"{name}.hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be a multiple of 4 "
                "(2-D rotary over height and width)"
            )
        check_choice(name, "hidden_act", self.hidden_act, ACTIVATIONS)
        dtype_of(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def grid_side(self) -> int:
        """Side of the square learned position grid (transformers' num_grid_per_side)."""
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    vision: Qwen3VLVisionConfig
    text: LlamaConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        name = type(self).__name__
        text = self.text
        if text.mrope_section is None or not text.mrope_interleaved:
            raise ValueError(f"{name}.text needs mrope_section with mrope_interleaved (Qwen3-VL)")
        if not text.qk_norm:
            raise ValueError(f"{name}.text.qk_norm must be True (Qwen3 normalises q and k)")
        if self.vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"{name}.vision.out_hidden_size ({self.vision.out_hidden_size}) must equal "
                f"text.hidden_size ({text.hidden_size})"
            )
        levels = len(self.vision.deepstack_visual_indexes)
        if levels > text.num_hidden_layers:
            raise ValueError(
                f"{name}: {levels} DeepStack levels need as many decoder layers, "
                f"text has {text.num_hidden_layers}"
            )
        for field in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        ):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Qwen3VLConfig:
        d = dict(d)
        return cls(
            vision=Qwen3VLVisionConfig(**d.pop("vision")), text=LlamaConfig(**d.pop("text")), **d
        )


# ----------------------------------------------------------------------------- host-side layout


class VisionLayout(NamedTuple):
    """Grid-dependent arrays for the tower on P patch slots: the real patches in input
    order, then padding slots (zero pixels, no position, never a key) up to P.

    Full attention scores queries in C chunks of ceil(P / C) slots, chunk i against the
    key slots chunk_keys[i] + key_offsets (the layout of `models.qwen2_5_vl`'s full
    attention); `vision_layout` gives one chunk over all slots.
    """

    positions: np.ndarray  # int32 [P, 2]: (h, w) rotary position of each slot
    table_index: np.ndarray  # int32 [P, 4]: position-table rows of each slot's bilinear taps
    table_weight: np.ndarray  # f32 [P, 4]: their weights (0 on padding slots)
    image_segment: np.ndarray  # int32 [P]: one temporal patch of one item, -1 padding
    chunk_keys: np.ndarray  # int32 [C]
    key_offsets: np.ndarray  # int32 [span]


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (int [n, 2]) and weights (f32 [n, 2]) of `index` on an axis of `size`
    patches resampled from `side` table entries, align_corners=True: transformers'
    `_interpolation_axis_taps_weights`, in its f32 arithmetic."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def vision_layout(grid_thw, cfg: Qwen3VLVisionConfig, slots: int | None = None) -> VisionLayout:
    """Rotary positions, position-table taps and attention segments for the items of
    `grid_thw` (int [n, 3]), mirroring transformers' `get_vision_position_ids`,
    `get_vision_interpolation_indices_and_weights` (bilinear, align_corners=True) and
    `get_vision_cu_seqlens` (one segment per temporal patch of each item). `slots` (>= the
    real count, a multiple of merge_unit) adds padding slots after the real patches."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, side = cfg.spatial_merge_size, cfg.grid_side
    if (grid < 1).any() or (grid[:, 1:] % m).any():
        raise ValueError(f"grid_thw {grid.tolist()} must be positive with h and w multiples of {m}")
    real = int(np.prod(grid, axis=1).sum())
    slots = real if slots is None else int(slots)
    if slots < real or slots % cfg.merge_unit:
        raise ValueError(
            f"layout slots {slots} must be a multiple of merge_unit={cfg.merge_unit} and >= the {real} patches"
        )
    positions = np.zeros((slots, 2), np.int64)
    table_index = np.zeros((slots, 4), np.int64)
    table_weight = np.zeros((slots, 4), np.float32)
    segment = np.full(slots, -1, np.int64)
    at = frame = 0
    for t, h, w in grid.tolist():
        # (h, w) of every patch, merge-block major, as the processor orders the rows
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        rows, cols = (a.reshape(block).transpose(0, 2, 1, 3).ravel() for a in (hpos, wpos))
        h_taps, h_weights = _axis_taps(rows, h, side)
        w_taps, w_weights = _axis_taps(cols, w, side)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        for f in range(t):  # every temporal patch repeats the frame's positions
            span = slice(at, at + h * w)
            positions[span] = np.stack([rows, cols], -1)
            table_index[span], table_weight[span] = index, weight
            segment[span] = frame + f
            at += h * w
        frame += t
    return VisionLayout(
        positions=positions.astype(np.int32),
        table_index=table_index.astype(np.int32),
        table_weight=table_weight,
        image_segment=segment.astype(np.int32),
        chunk_keys=np.zeros(1, np.int32),
        key_offsets=np.arange(slots, dtype=np.int32),
    )


# ----------------------------------------------------------------------------- vision tower


def _layer_norm(dim: int, dtype: str, rngs: nnx.Rngs) -> nnx.LayerNorm:
    dt = dtype_of(dtype)
    # two-pass variance, like torch's LayerNorm
    return nnx.LayerNorm(
        dim,
        epsilon=VISION_NORM_EPS,
        use_fast_variance=False,
        dtype=dt,
        param_dtype=dt,
        rngs=rngs,
    )


def _linear(din: int, dout: int, dtype: str, rngs: nnx.Rngs) -> nnx.Linear:
    dt = dtype_of(dtype)
    return nnx.Linear(din, dout, dtype=dt, param_dtype=dt, rngs=rngs)


class VisionMLP(nnx.Module):
    """linear_fc2(act(linear_fc1(x))), with biases."""

    def __init__(self, cfg: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.act = activation(cfg.hidden_act)
        self.linear_fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, rngs)
        self.linear_fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, cfg.dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg.hidden_size, cfg.dtype, rngs)
        self.attn = VisionAttention(cfg, rngs=rngs)  # Qwen2.5-VL's: fused qkv, 2-D rotary
        self.norm2 = _layer_norm(cfg.hidden_size, cfg.dtype, rngs)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, layout: VisionLayout) -> jax.Array:
        """x: [P, D] -> [P, D]; attention within each slot's segment."""
        x = x + self.attn(self.norm1(x), cos, sin, layout, True)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm, concatenate each merge block, Linear -> exact GELU -> Linear. The final
    merger normalises each patch before concatenating; the DeepStack mergers
    (`postshuffle`) normalise the concatenated block."""

    def __init__(self, cfg: Qwen3VLVisionConfig, postshuffle: bool, *, rngs: nnx.Rngs):
        self.width = cfg.hidden_size * cfg.merge_unit
        self.postshuffle = postshuffle
        self.norm = _layer_norm(self.width if postshuffle else cfg.hidden_size, cfg.dtype, rngs)
        self.linear_fc1 = _linear(self.width, self.width, cfg.dtype, rngs)
        self.linear_fc2 = _linear(self.width, cfg.out_hidden_size, cfg.dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[P, D] -> [P / merge_unit, out_hidden_size]."""
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.width))
        else:
            x = self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VLVisionTransformer(nnx.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.config = cfg
        # Conv3d with stride == kernel over one flattened patch is a matmul (with a bias here).
        self.patch_embed = _linear(cfg.patch_dim, cfg.hidden_size, cfg.dtype, rngs)
        self.pos_embed = nnx.Embed(
            cfg.num_position_embeddings, cfg.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs
        )
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, False, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, True, rngs=rngs) for _ in cfg.deepstack_visual_indexes]
        )

    def _position_embeddings(self, layout: VisionLayout) -> jax.Array:
        """[P, D]: each slot's four table rows weighted (summed in f32, as transformers)."""
        rows = jnp.take(self.pos_embed.embedding[...], jnp.asarray(layout.table_index), axis=0)
        weight = jnp.asarray(layout.table_weight, jnp.float32)[..., None]
        return jnp.sum(rows.astype(jnp.float32) * weight, axis=1)

    def __call__(
        self, pixel_values: jax.Array, layout: VisionLayout
    ) -> tuple[jax.Array, jax.Array]:
        """pixel_values [n <= P, C*T*p*p] (rows past n are padding) -> (merged tokens
        [U, out_hidden_size], DeepStack features [levels, U, out_hidden_size]), U = P /
        merge_unit, the items' tokens in input order first, then padding; levels in block
        order (transformers' order, which the decoder consumes)."""
        cfg = self.config
        slots = layout.image_segment.shape[0]
        pixels = pixel_values.astype(self.patch_embed.kernel.dtype)
        pixels = jnp.pad(pixels, ((0, slots - pixels.shape[0]), (0, 0)))
        x = self.patch_embed(pixels)
        x = x + self._position_embeddings(layout).astype(x.dtype)
        cos, sin = axial_rotary(jnp.asarray(layout.positions), cfg.head_dim, cfg.rope_theta)
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout)
            if i in cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)]
                levels.append(merger(x))
        merged = self.merger(x)
        if not levels:
            return merged, jnp.zeros((0,) + merged.shape, merged.dtype)
        return merged, jnp.stack(levels)


# ----------------------------------------------------------------------------- full model


class Qwen3VLForConditionalGeneration(nnx.Module):
    # Parameter shardings over a ("data", "model") mesh, as Qwen2.5-VL's: fused qkv, fc1
    # layers by output columns, proj and fc2 by input rows, the patch embedding and the
    # position table by channel, then the decoder's own table.
    SHARDING_RULES = prefixed_rules(
        "visual",
        (
            (r"patch_embed\.kernel", (None, "model")),
            (r"patch_embed\.bias", ("model",)),
            (r"pos_embed\.embedding", (None, "model")),
            (r"blocks\.\d+\.attn\.qkv\.kernel", (None, "model")),
            (r"blocks\.\d+\.attn\.qkv\.bias", ("model",)),
            (r"blocks\.\d+\.attn\.proj\.kernel", ("model", None)),
            (r"blocks\.\d+\.mlp\.linear_fc1\.kernel", (None, "model")),
            (r"blocks\.\d+\.mlp\.linear_fc1\.bias", ("model",)),
            (r"blocks\.\d+\.mlp\.linear_fc2\.kernel", ("model", None)),
            (r"(merger|deepstack_merger_list\.\d+)\.linear_fc1\.kernel", (None, "model")),
            (r"(merger|deepstack_merger_list\.\d+)\.linear_fc1\.bias", ("model",)),
            (r"(merger|deepstack_merger_list\.\d+)\.linear_fc2\.kernel", ("model", None)),
        ),
    ) + prefixed_rules("language_model", llama.SHARDING_RULES)

    def __init__(self, cfg: Qwen3VLConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = Qwen3VLVisionTransformer(cfg.vision, rngs=rngs)
        self.language_model = LlamaForCausalLM(cfg.text, rngs=rngs)

    def image_features(
        self, pixel_values: jax.Array, layout: VisionLayout
    ) -> tuple[jax.Array, jax.Array]:
        """(merged tokens [U, D_text], DeepStack features [levels, U, D_text]), items concatenated."""
        return self.visual(pixel_values, layout)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Text embeddings [B, L, D] (placeholders embed as themselves; replaced later)."""
        return self.language_model.embed(input_ids)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        layout: VisionLayout | None,
        positions: jax.Array,
        attention_mask: jax.Array,
    ) -> jax.Array:
        """Full forward (no cache): f32 logits [B, L, V].

        The merged tokens go to the image and video placeholders in reading order across the
        batch (the items of `layout` in that order), and DeepStack level i is added at the
        same positions after decoder layer i. positions: int [3, B, L] (transformers'
        `get_rope_index`); attention_mask: [B, L] (left padding).
        """
        embeds = self.embed_tokens(input_ids)
        deepstack = ()
        if pixel_values is not None:
            merged, levels = self.image_features(pixel_values, layout)
            visual = (input_ids == self.config.image_token_id) | (
                input_ids == self.config.video_token_id
            )
            # each row's k-th visual token is feature offset_b + k
            counts = jnp.sum(visual, axis=1)
            index = (jnp.cumsum(counts) - counts)[:, None] + jnp.arange(visual.shape[1])
            index = jnp.clip(index, 0, merged.shape[0] - 1)  # [B, L]
            order = jnp.clip(jnp.cumsum(visual.reshape(-1)) - 1, 0, merged.shape[0] - 1)
            embeds = jnp.where(
                visual[..., None], merged[order.reshape(visual.shape)].astype(embeds.dtype), embeds
            )
            deepstack = tuple(
                DeepStackInput(i, levels[i][index], visual) for i in range(levels.shape[0])
            )
        hidden, _ = self.language_model.model(
            embeds, positions, padding_causal_mask(attention_mask), deepstack=deepstack
        )
        return self.language_model.logits(hidden)
