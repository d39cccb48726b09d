"""CLIP vision tower (ViT) as used by LLaVA, in Flax NNX.

Attribute names mirror transformers' `CLIPVisionTransformer` so the converter's key table
is a plain rename; all hidden states are returned so LLaVA can pick
`hidden_states[vision_feature_layer]` (index 0 is pre_layrnorm(embeddings)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (
    ACTIVATIONS,
    activation,
    check_choice,
    check_positive,
    dot_product_attention,
    dtype_of,
)

# Tensor parallelism over "model" (zspa_jax.sharding): attention q/k/v and fc1 split by
# output columns, out_proj and fc2 by input rows, the patch convolution by output channel.
SHARDING_RULES = (
    (r"embeddings\.patch_embedding\.kernel", (None, None, None, "model")),
    (r"encoder\.layers\.\d+\.self_attn\.[qkv]_proj\.kernel", (None, "model")),
    (r"encoder\.layers\.\d+\.self_attn\.[qkv]_proj\.bias", ("model",)),
    (r"encoder\.layers\.\d+\.self_attn\.out_proj\.kernel", ("model", None)),
    (r"encoder\.layers\.\d+\.mlp\.fc1\.kernel", (None, "model")),
    (r"encoder\.layers\.\d+\.mlp\.fc1\.bias", ("model",)),
    (r"encoder\.layers\.\d+\.mlp\.fc2\.kernel", ("model", None)),
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        name = type(self).__name__
        check_positive(
            name,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{name}.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{name}.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        check_choice(name, "hidden_act", self.hidden_act, ACTIVATIONS)
        dtype_of(self.dtype)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _linear(cfg: CLIPVisionConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    dt = dtype_of(cfg.dtype)
    return nnx.Linear(din, dout, use_bias=True, dtype=dt, param_dtype=dt, rngs=rngs)


def _layer_norm(cfg: CLIPVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    dt = dtype_of(cfg.dtype)
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dt, param_dtype=dt, rngs=rngs
    )


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.hidden_size,), dt) * 0.02
        )
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dt,
            param_dtype=dt,
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, cfg.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [B, C, H, W] (the HF processor's NCHW layout) -> [B, 1 + P, D]."""
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.patch_embedding.kernel.dtype)
        patches = self.patch_embedding(x)  # [B, H/p, W/p, D]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, patches.shape[-1])).astype(
            patches.dtype
        )
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding.embedding[None, : tokens.shape[1]].astype(
            tokens.dtype
        )


class ClsAttention(NamedTuple):
    """What the [CLS]-attention pruning methods read from one encoder layer.

    probs: f32 [B, 1 + P] softmax attention of the [CLS] query (row 0) to every token,
      averaged over heads (what transformers' `output_attentions` gives as
      `attentions[i][:, :, 0, :].mean(1)`).
    keys: f32 [B, 1 + P, head_dim] that layer's key vectors averaged over heads.
    """

    probs: jax.Array
    keys: jax.Array


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = _linear(cfg, d, d, rngs)
        self.k_proj = _linear(cfg, d, d, rngs)
        self.v_proj = _linear(cfg, d, d, rngs)
        self.out_proj = _linear(cfg, d, d, rngs)

    def __call__(
        self, x: jax.Array, cls_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, ClsAttention]:
        """x [B, L, D] -> [B, L, D]; with `cls_attention`, also the [CLS] row (see ClsAttention)."""
        b, seq, _ = x.shape
        split = lambda t: t.reshape(b, seq, self.num_heads, self.head_dim)
        q, k = split(self.q_proj(x)), split(self.k_proj(x))
        out = self.out_proj(
            dot_product_attention(q, k, split(self.v_proj(x)), mask=None).reshape(b, seq, -1)
        )
        if not cls_attention:
            return out
        scores = jnp.einsum("bhd,bshd->bhs", q[:, 0], k).astype(jnp.float32) / math.sqrt(
            self.head_dim
        )
        probs = jnp.mean(jax.nn.softmax(scores, axis=-1), axis=1)
        return out, ClsAttention(probs, jnp.mean(k.astype(jnp.float32), axis=2))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.act = activation(cfg.hidden_act)
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cls_attention: bool = False):
        """x [B, L, D] -> [B, L, D] (and the layer's ClsAttention when asked)."""
        attn = self.self_attn(self.layer_norm1(x), cls_attention)
        row = None
        if cls_attention:
            attn, row = attn
        x = x + attn
        x = x + self.mlp(self.layer_norm2(x))
        return x if row is None else (x, row)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )


class CLIPVisionModel(nnx.Module):
    """The vision transformer of CLIP (no projection head)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg, rngs)  # sic: transformers' spelling
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = _layer_norm(cfg, rngs)

    has_cls_token = True  # index 0 of every hidden state is [CLS]

    def hidden_states(
        self,
        pixel_values: jax.Array,
        num_layers: int | None = None,
        cls_attention_layer: int | None = None,
    ) -> list[jax.Array] | tuple[list[jax.Array], ClsAttention]:
        """All hidden states: [pre_layrnorm(embeddings), after layer 1, ..., after layer `num_layers`].

        pixel_values: [B, C, H, W]; each entry is [B, 1 + P, D]. `num_layers` stops the
        encoder early (LLaVA's default feature layer -2 never needs the last layer).
        `cls_attention_layer`: an encoder layer index i (0-based, transformers'
        `attentions[i]`; the layer whose output is hidden state i + 1). When given, returns
        (states, ClsAttention of that layer): only the [CLS] query's row, never the maps.
        """
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(NCHW), got {tuple(pixel_values.shape)}"
            )
        n_layers = self.config.num_hidden_layers
        if cls_attention_layer is not None and not 0 <= cls_attention_layer < min(
            n_layers, num_layers or n_layers
        ):
            raise ValueError(
                f"cls_attention_layer must be an encoder layer index in [0, {min(n_layers, num_layers or n_layers)}), "
                f"got {cls_attention_layer}"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states, row = [x], None
        for i, layer in enumerate(self.encoder.layers[:num_layers]):
            if i == cls_attention_layer:
                x, row = layer(x, cls_attention=True)
            else:
                x = layer(x)
            states.append(x)
        return states if cls_attention_layer is None else (states, row)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (last_hidden_state [B, 1 + P, D], pooled [B, D] = post_layernorm(CLS))."""
        last = self.hidden_states(pixel_values)[-1]
        return last, self.post_layernorm(last[:, 0])
