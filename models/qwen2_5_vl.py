"""Qwen2.5-VL in Flax NNX: windowed ViT -> patch merger -> Qwen2 decoder with M-RoPE.

Follows transformers' `modeling_qwen2_5_vl.py`. The tower works on the processors'
flattened patches `[P, C * T * p * p]` (all images and videos of a batch concatenated in
reading order: one Conv3d patch embedding over temporal_patch_size frames per row) and
their grids `[n, 3]` of (t, h, w), t temporal patches (1 for an image). Everything that
depends on the grid values (window order, rotary positions, attention segments, 3-D LLM
positions) is computed on the host in numpy (`vision_layout`, `rope_index`), so the
jitted programs only see arrays of static shape (that host code lives with the family's adapter,
`zspa_jax.families.qwen2_5_vl.layout`; this module holds the types it fills and the NNX
modules). The tower runs on P patch slots: the real patches packed densely in
transformers' window order, then padding slots up to a bucket (`vision_layout(...,
slots=)`), so images of different sizes share one compiled tower while every block
(linear layers, windowed and full attention) pays only for the real patches plus the
bucket's padding. Attention of both kinds scores queries in chunks, each against only
the key slots that can hold its queries' window (windowed blocks) or segment (full
attention).

The language model is `models.llama.LlamaForCausalLM` with q/k/v biases and
`mrope_section`: the same decoder and KV cache as LLaVA's.
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
    MASK_VALUE,
    check_choice,
    check_positive,
    dot_product_attention,
    dtype_of,
    padding_causal_mask,
    prefixed_rules,
)
from models.llama import (
    GatedMLP,
    LlamaConfig,
    LlamaForCausalLM,
    RMSNorm,
    rope_inverse_frequencies,
    rotate,
)
from models.protocol import MultimodalInputs

VISION_NORM_EPS = 1e-6  # hard-coded in transformers' vision blocks and merger


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    # video temporal positions per second (transformers' default 4; the 7B uses 2)
    tokens_per_second: int = 4
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
        )
        tps = self.tokens_per_second
        if not isinstance(tps, int) or isinstance(tps, bool) or tps < 0:
            raise ValueError(
                f"{name}.tokens_per_second must be an integer >= 0, got {self.tokens_per_second!r}"
            )
        object.__setattr__(
            self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes)
        )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"{name}.fullatt_block_indexes {bad} out of range for depth {self.depth}"
            )
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"{name}.hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be a multiple of 4 "
                "(2-D rotary over height and width)"
            )
        if self.window_size < self.patch_size * self.spatial_merge_size:
            raise ValueError(
                f"{name}.window_size ({self.window_size}) must be >= patch_size * spatial_merge_size "
                f"({self.patch_size * self.spatial_merge_size})"
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
    def window_merged(self) -> int:
        """Window side in merged tokens (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    vision: Qwen2_5_VLVisionConfig
    text: LlamaConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        name = type(self).__name__
        if self.text.mrope_section is None:
            raise ValueError(f"{name}.text.mrope_section is required (Qwen2.5-VL uses M-RoPE)")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"{name}.vision.out_hidden_size ({self.vision.out_hidden_size}) must equal "
                f"text.hidden_size ({self.text.hidden_size})"
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
    def from_dict(cls, d: dict) -> Qwen2_5_VLConfig:
        d = dict(d)
        return cls(
            vision=Qwen2_5_VLVisionConfig(**d.pop("vision")), text=LlamaConfig(**d.pop("text")), **d
        )


# ----------------------------------------------------------------------------- inputs the jitted programs take
# (computed on the host by zspa_jax.families.qwen2_5_vl.layout)


class VisionLayout(NamedTuple):
    """Grid-dependent index arrays for the tower (see `vision_layout`).

    The tower runs on P slots: the real patches packed densely in transformers' window
    order (window after window, item after item), then padding slots up to the bucket.
    U = P / merge_unit merged slots. Attention of both kinds scores queries in chunks of
    ceil(P / C) slots (the last chunk's missing slots are added inside the model as
    padding); chunk i reads only the keys [start_i, start_i + span) of the padded slots,
    which hold every key of its queries' windows (windowed blocks) or segments (full).
    """

    # int32 [P]: source patch row of each slot (num_patches = a zero row for padding)
    order: np.ndarray
    positions: np.ndarray  # int32 [P, 2]: (h, w) rotary position of each slot
    valid: np.ndarray  # bool [P]: the slot holds a real patch (the first num_patches slots)
    # int32 [P]: full-attention segment (one temporal patch of one item) of each slot, -1 padding
    image_segment: np.ndarray
    # int32 [U]: merged slot of each merged token in input order, padding slots last
    inverse: np.ndarray
    # int32 [P]: window of each slot (windowed attention's segment), -1 padding
    window_segment: np.ndarray
    # Full attention: for each of C query chunks, the first key slot of its key span.
    chunk_keys: np.ndarray  # int32 [C]
    key_offsets: np.ndarray  # int32 [span]: 0, 1, ..., span - 1
    # Windowed attention: the same for Cw chunks of at most one window's slots each.
    window_keys: np.ndarray  # int32 [Cw]
    window_offsets: np.ndarray  # int32 [span_w]


def window_slots(cfg: Qwen2_5_VLVisionConfig) -> int:
    """Patch rows of one full window: window_merged^2 merged tokens of merge_unit patches."""
    return cfg.window_merged**2 * cfg.merge_unit


def chunk_size(slots: int, chunks: int) -> int:
    """Query slots per chunk when `slots` are scored in `chunks` chunks (the last padded)."""
    return -(-slots // chunks)


class QwenAux(NamedTuple):
    """Host-computed arrays the jitted Qwen2.5-VL programs take (a pytree; see `prepare_batch`)."""

    layout: VisionLayout
    positions: np.ndarray  # int32 [3, B, L]: M-RoPE positions of the (unpruned) prompt
    next_position: np.ndarray  # int32 [B]: max position + 1, where decoding continues
    # int32 [B, L]: merged-token index of each real image or video token, -1 elsewhere
    feature_index: np.ndarray
    # The visual layout when pruning (models.protocol), else None:
    # int32 [B, N]: merged-token index of each placeholder slot (0 on padding)
    visual_index: np.ndarray | None
    visual_valid: np.ndarray | None  # bool [B, N]: False on slots added to give every row N
    # int32 [B, I, n]: each image's or video's slots in [0, N), -1 padding
    image_index: np.ndarray | None = None
    # int32 [B, I, 2]: each item's merged-token grid (h, w) / merge (single frames only)
    image_grid: np.ndarray | None = None


# ----------------------------------------------------------------------------- vision tower


# full-attention blocks score this many queries at a time (memory ~ H * chunk * key span)
QUERY_CHUNK = 256


def _segment_attention(q, k, v, segment, chunk_keys, key_offsets, sequential: bool) -> jax.Array:
    """Attention within segments (a window, or one temporal patch of one item): q, k, v
    [P, H, Dh]; segment int [P], -1 = padding (never a key). Queries go in C =
    len(chunk_keys) chunks of ceil(P / C) slots (P padded to C chunks here); chunk i scores
    only the keys chunk_keys[i] + key_offsets of the padded slots, which hold every key of
    its queries' segments, so the cost is P x span, not P x P. `sequential`: one head of
    one chunk at a time (scores [chunk, span] live at once and stay in cache: full
    attention's long spans) instead of all chunks and heads together (windowed attention's
    short spans). Returns [P, H, Dh]."""
    p, h, dh = q.shape
    chunks, span = chunk_keys.shape[0], key_offsets.shape[0]
    chunk = chunk_size(p, chunks)
    extra = chunks * chunk - p
    segment = jnp.asarray(segment)
    if extra:
        q, k, v = (jnp.pad(a, ((0, extra), (0, 0), (0, 0))) for a in (q, k, v))
        segment = jnp.pad(segment, (0, extra), constant_values=-1)
    chunk_keys, key_offsets = jnp.asarray(chunk_keys), jnp.asarray(key_offsets)
    segs = segment.reshape(chunks, chunk)

    def mask_of(seg, kseg):  # [..., chunk], [..., span] -> [..., chunk, span]
        return (seg[..., :, None] == kseg[..., None, :]) & (kseg >= 0)[..., None, :]

    if not sequential:
        if span == chunks * chunk:  # small P: each chunk reads all slots, no gather
            kc, vc, kseg = (jnp.broadcast_to(a[None], (chunks,) + a.shape) for a in (k, v, segment))
        else:
            index = chunk_keys[:, None] + key_offsets  # [C, span]
            kc, vc, kseg = k[index], v[index], segment[index]
        out = dot_product_attention(q.reshape(chunks, chunk, h, dh), kc, vc, mask_of(segs, kseg))
        return out.reshape(chunks * chunk, h, dh)[:p]

    # Head-major, so a (head, chunk) step reads contiguous [span, Dh] keys and values.
    qh, kh, vh = (jnp.moveaxis(a, 1, 0) for a in (q, k, v))  # [H, P', Dh]
    scale = 1.0 / math.sqrt(dh)

    def one(args):
        qc, seg, start, head = args  # [chunk, Dh], [chunk], [], []
        kc, vc = (
            jax.lax.dynamic_slice_in_dim(
                jax.lax.dynamic_index_in_dim(a, head, keepdims=False), start, span
            )
            for a in (kh, vh)
        )
        kseg = jax.lax.dynamic_slice_in_dim(segment, start, span)
        # dot_product_attention's math on 2-D operands (its grouped 5-D einsum with unit
        # batch and head axes compiles to a ~3x slower CPU program)
        scores = jnp.einsum("ld,sd->ls", qc, kc).astype(jnp.float32) * scale
        scores = jnp.where(mask_of(seg, kseg), scores, MASK_VALUE)
        return jnp.einsum("ls,sd->ld", jax.nn.softmax(scores, axis=-1).astype(vc.dtype), vc)

    heads = jnp.repeat(jnp.arange(h, dtype=jnp.int32), chunks)
    out = jax.lax.map(
        one,
        (qh.reshape(h * chunks, chunk, dh), jnp.tile(segs, (h, 1)), jnp.tile(chunk_keys, h), heads),
    )
    return jnp.moveaxis(out.reshape(h, chunks * chunk, dh), 0, 1)[:p]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.num_heads = cfg.num_heads
        self.qkv = nnx.Linear(
            cfg.hidden_size, 3 * cfg.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs
        )
        self.proj = nnx.Linear(
            cfg.hidden_size, cfg.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: VisionLayout, full: bool
    ):
        """x: [P, D]; cos, sin: f32 [P, Dh / 2]. Windowed attention, or per segment when `full`."""
        p, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, -1), 1, 0)
        # transformers rotates in f32 and casts back
        q = rotate(q.astype(jnp.float32), cos[:, None], sin[:, None]).astype(x.dtype)
        k = rotate(k.astype(jnp.float32), cos[:, None], sin[:, None]).astype(x.dtype)
        if full:
            out = _segment_attention(
                q, k, v, layout.image_segment, layout.chunk_keys, layout.key_offsets, True
            )
        else:
            out = _segment_attention(
                q, k, v, layout.window_segment, layout.window_keys, layout.window_offsets, False
            )
        return self.proj(out.reshape(p, d))


class VisionMLP(GatedMLP):
    """SwiGLU with biases."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        super().__init__(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, True, cfg.dtype, rngs=rngs
        )


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS, dt)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS, dt)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, layout, full: bool):
        x = x + self.attn(self.norm1(x), cos, sin, layout, full)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, concatenate each spatial_merge_size^2 block, Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.width = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, VISION_NORM_EPS, dt)
        self.fc1 = nnx.Linear(self.width, self.width, dtype=dt, param_dtype=dt, rngs=rngs)
        self.fc2 = nnx.Linear(self.width, cfg.out_hidden_size, dtype=dt, param_dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[P, D] (window order, merge_unit consecutive slots per merged token) -> [P / merge_unit, out_hidden_size]."""
        return self.fc2(
            jax.nn.gelu(self.fc1(self.ln_q(x).reshape(-1, self.width)), approximate=False)
        )


def axial_rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D axial rotary: [P, 2] (h, w) -> f32 cos, sin [P, head_dim / 2] (h angles, then w),
    each axis with the frequencies of a head_dim / 2 rotary (the Qwen-VL towers')."""
    inv_freq = rope_inverse_frequencies(head_dim // 2, theta)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [P, 2, Dh / 4]
    freqs = freqs.reshape(positions.shape[0], -1)
    return jnp.cos(freqs), jnp.sin(freqs)


class Qwen2_5_VisionTransformer(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.config = cfg
        # Conv3d with stride == kernel over one flattened patch is a matmul (no bias).
        self.patch_embed = nnx.Linear(
            cfg.patch_dim, cfg.hidden_size, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs
        )
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, rngs=rngs)

    def _angles(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return axial_rotary(positions, self.config.head_dim, self.config.rope_theta)

    def blocks_out(
        self, pixel_values: jax.Array, layout: VisionLayout, num_blocks: int | None = None
    ) -> list[jax.Array]:
        """Hidden states after each block on the layout's slots: list of [P, D]
        (`layout.valid` marks the real patches, in transformers' window order)."""
        cfg = self.config
        dt = self.patch_embed.kernel.dtype
        # One zero row after the real patches: what every padding slot reads.
        pixels = jnp.concatenate(
            [pixel_values.astype(dt), jnp.zeros((1, pixel_values.shape[1]), dt)]
        )
        x = self.patch_embed(jnp.take(pixels, layout.order, axis=0))
        cos, sin = self._angles(layout.positions)
        states = []
        for i, block in enumerate(self.blocks[: cfg.depth if num_blocks is None else num_blocks]):
            x = block(x, cos, sin, layout, i in cfg.fullatt_block_indexes)
            states.append(x)
        return states

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values [num_patches (+ zero rows), C*T*p*p] -> merged tokens [U, out_hidden_size]: the
        images' tokens in input order first, then padding slots."""
        merged = self.merger(self.blocks_out(pixel_values, layout)[-1])
        return jnp.take(merged, layout.inverse, axis=0)


# ----------------------------------------------------------------------------- full model


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    # Parameter shardings over a ("data", "model") mesh: the tower like the decoder (fused
    # qkv, gate/up and merger fc1 by output columns; proj, down and fc2 by input rows),
    # the patch embedding by output channel, then the decoder's own table.
    SHARDING_RULES = prefixed_rules(
        "visual",
        (
            (r"patch_embed\.kernel", (None, "model")),
            (r"blocks\.\d+\.attn\.qkv\.kernel", (None, "model")),
            (r"blocks\.\d+\.attn\.qkv\.bias", ("model",)),
            (r"blocks\.\d+\.attn\.proj\.kernel", ("model", None)),
            (r"blocks\.\d+\.mlp\.(gate|up)_proj\.kernel", (None, "model")),
            (r"blocks\.\d+\.mlp\.(gate|up)_proj\.bias", ("model",)),
            (r"blocks\.\d+\.mlp\.down_proj\.kernel", ("model", None)),
            (r"merger\.fc1\.kernel", (None, "model")),
            (r"merger\.fc1\.bias", ("model",)),
            (r"merger\.fc2\.kernel", ("model", None)),
        ),
    ) + prefixed_rules("language_model", llama.SHARDING_RULES)

    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = Qwen2_5_VisionTransformer(cfg.vision, rngs=rngs)
        self.language_model = LlamaForCausalLM(cfg.text, rngs=rngs)

    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """Merged visual tokens in the LLM embedding space [U, D_text], images concatenated."""
        return self.visual(pixel_values, layout)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Text embeddings [B, L, D] (image placeholders embed as themselves; replaced later)."""
        return self.language_model.embed(input_ids)

    def inputs_embeds(
        self, input_ids: jax.Array, pixel_values: jax.Array | None, layout: VisionLayout | None
    ) -> jax.Array:
        """Text embeddings with the merged tokens written at the image and video placeholders,
        in reading order (the items of `layout`, images and videos, in that order)."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values, layout)
        visual = (input_ids == self.config.image_token_id) | (
            input_ids == self.config.video_token_id
        )
        order = jnp.clip(jnp.cumsum(visual.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(
            visual.shape
        )
        return jnp.where(visual[..., None], features[order].astype(embeds.dtype), embeds)

    def multimodal_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array,
        aux: QwenAux,
    ) -> MultimodalInputs:
        """The family protocol (models.protocol), with `aux` from `prepare_batch`: 3-D
        positions, visual tokens written at `aux.feature_index`, and when pruning the
        visual layout (each row's visual tokens [B, N, D], its images' slots and grids)."""
        text = self.embed_tokens(input_ids)
        if pixel_values is None:
            return MultimodalInputs(text, text, aux.positions, aux.next_position, None, None)
        features = self.image_features(pixel_values, aux.layout)  # [U, D]
        index = aux.feature_index
        merged = jnp.where(
            (index >= 0)[..., None], features[jnp.maximum(index, 0)].astype(text.dtype), text
        )
        visual = None if aux.visual_index is None else features[aux.visual_index]
        return MultimodalInputs(
            merged,
            text,
            aux.positions,
            aux.next_position,
            visual,
            aux.visual_valid,
            aux.image_index,
            aux.image_grid,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        layout: VisionLayout | None,
        positions: jax.Array,
        attention_mask: jax.Array,
    ) -> jax.Array:
        """Full forward (no cache): f32 logits [B, L, V].

        positions: int [3, B, L] from `rope_index`; attention_mask: [B, L] (left padding).
        """
        embeds = self.inputs_embeds(input_ids, pixel_values, layout)
        hidden, _ = self.language_model.model(
            embeds, positions, padding_causal_mask(attention_mask)
        )
        return self.language_model.logits(hidden)
