"""LLaMA decoder in Flax NNX: RMSNorm, RoPE, MHA/GQA/MQA, SwiGLU, tied or untied head.

The same decoder serves Qwen2 (the language model of Qwen2.5-VL): `qkv_bias` adds biases
to q/k/v only, and `mrope_section` turns on multimodal RoPE, where positions are
[3, B, L] (temporal, height, width rows) and each block of rotary frequencies takes its
angle from one row. And Qwen3 (Qwen3-VL's): `qk_norm` adds a per-head RMSNorm on q and k
before RoPE, `mrope_interleaved` takes the t/h/w frequencies in turn instead of in
blocks, and the forward pass accepts DeepStack inputs (`DeepStackInput`: visual
features added to the hidden states at the visual positions after a given layer).

The KV cache is a plain pytree (`KVCache`) passed in and returned, so a decode loop can
carry it through `lax.while_loop` and the caller owns its size. Attribute names mirror
transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (
    ACTIVATIONS,
    MASK_VALUE,
    activation,
    causal_prompt_attention,
    check_choice,
    check_positive,
    dot_product_attention,
    dtype_of,
    padding_causal_mask,
    positions_from_mask,
)

# Tensor parallelism over "model" (applied by zspa_jax.sharding): q/k/v/gate/up split by
# output columns (with their biases), o/down by input rows, so each layer needs one
# reduction per block; the embedding table split over hidden, the head over vocab.
SHARDING_RULES = (
    (r"model\.embed_tokens\.embedding", (None, "model")),
    (r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.kernel", (None, "model")),
    (r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias", ("model",)),
    (r"model\.layers\.\d+\.self_attn\.o_proj\.kernel", ("model", None)),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.kernel", (None, "model")),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.bias", ("model",)),
    (r"model\.layers\.\d+\.mlp\.down_proj\.kernel", ("model", None)),
    (r"lm_head\.kernel", (None, "model")),
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # biases on q, k, v and o (LLaMA's flag)
    mlp_bias: bool = False
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2); o follows attention_bias
    mrope_section: tuple[int, ...] | None = None  # M-RoPE: rotary pairs per t/h/w row
    mrope_interleaved: bool = False  # M-RoPE frequencies t, h, w, t, h, w, ... (Qwen3-VL)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    dtype: str = "float32"

    def __post_init__(self):
        name = type(self).__name__
        check_positive(
            name,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"{name}.hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}) when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        check_positive(name, head_dim=self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{name}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"{name}.rope_theta must be > 0, got {self.rope_theta}")
        check_choice(name, "hidden_act", self.hidden_act, ACTIVATIONS)
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
                raise ValueError(
                    f"{name}.mrope_section must be 3 non-negative ints (t, h, w), got {self.mrope_section}"
                )
            if sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(
                    f"{name}.mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = {self.head_dim // 2}"
                )
        elif self.mrope_interleaved:
            raise ValueError(f"{name}.mrope_interleaved needs mrope_section")
        dtype_of(self.dtype)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys and values, one array per decoder layer.

    k[i], v[i]: [B, S, num_key_value_heads, head_dim]. Slot s of row b holds the token
    written at cache index s; which slots are valid is the caller's mask. Separate arrays
    per layer (not one stacked array) let XLA update each in place without re-stacking.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, length: int, dtype=None) -> KVCache:
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        dt = dtype_of(cfg.dtype) if dtype is None else dtype
        layers = range(cfg.num_hidden_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dt) for _ in layers),
            v=tuple(jnp.zeros(shape, dt) for _ in layers),
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in f32, cast back, then scale (transformers' order)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """f32 [head_dim / 2]; the power is taken in f64 and rounded once, like a correctly
    rounded f32 pow, so frequencies agree with torch bit for bit in practice."""
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    return (
        np.float32(1.0)
        / np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)
    ).astype(np.float32)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE with precomputed angles. x: [..., Dh]; cos, sin: [..., Dh / 2]
    broadcastable to x's leading axes. Same arithmetic as transformers' x * cos +
    rotate_half(x) * sin with cos/sin duplicated over both halves."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mrope_rows(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
    """int [sum(mrope_section)]: the position row (0 t, 1 h, 2 w) each rotary frequency reads.

    Blocks (Qwen2-VL, Qwen2.5-VL): mrope_section[0] frequencies from t, then h, then w.
    Interleaved (Qwen3-VL, transformers' `recomposition_frequencies`): frequency j reads h
    when j % 3 == 1 and j < 3 * mrope_section[1], w when j % 3 == 2 and j < 3 *
    mrope_section[2], t otherwise.
    """
    if not interleaved:
        return np.repeat(np.arange(3), mrope_section)
    rows = np.zeros(sum(mrope_section), np.int64)
    for row in (1, 2):
        rows[row : 3 * mrope_section[row] : 3] = row
    return rows


def rope_angles(
    positions: jax.Array,
    inv_freq: np.ndarray,
    mrope_section: tuple[int, ...] | None = None,
    mrope_interleaved: bool = False,
) -> jax.Array:
    """f32 rotary angles [B, L, Dh / 2].

    positions: int [B, L] (plain RoPE; with M-RoPE a text-only position, the same on all
    three rows) or [3, B, L] (M-RoPE: each frequency takes its angle from the row
    `mrope_rows` gives it).
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    if positions.ndim == 2:
        return freqs
    if positions.ndim != 3 or mrope_section is None:
        raise ValueError(
            f"positions must be [B, L] (or [3, B, L] with mrope_section), got shape {positions.shape}"
        )
    rows = mrope_rows(mrope_section, mrope_interleaved)
    return jnp.where(rows == 0, freqs[0], jnp.where(rows == 1, freqs[1], freqs[2]))


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    inv_freq: np.ndarray,
    mrope_section: tuple[int, ...] | None = None,
    mrope_interleaved: bool = False,
) -> jax.Array:
    """Rotate-half RoPE. x: [B, L, H, Dh]; positions: int [B, L] or [3, B, L] (M-RoPE)."""
    freqs = rope_angles(positions, inv_freq, mrope_section, mrope_interleaved)
    cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
    return rotate(x, cos, sin)


def last_query_attention(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """f32 [B, S]: softmax attention of the last query to every key, averaged over heads.

    q: [B, L, H, Dh]; k: [B, S, Hkv, Dh] (GQA groups share a key head); mask: bool [B, L, S].
    Equals transformers' `output_attentions[i][:, :, -1, :].mean(1)` (eager attention).
    """
    b, _, h, dh = q.shape
    hkv = k.shape[2]
    qg = q[:, -1].reshape(b, hkv, h // hkv, dh)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k).astype(jnp.float32) / np.sqrt(dh).astype(
        np.float32
    )
    scores = jnp.where(mask[:, -1][:, None, None, :], scores, MASK_VALUE)
    return jnp.mean(jax.nn.softmax(scores, axis=-1), axis=(1, 2))


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`dot_product_attention` for one query per row (a decode step), reading the cache in place.

    q: [B, 1, H, Dh]; k, v: [B, S, Hkv, Dh]; mask: bool [B, 1, S] -> [B, 1, H, Dh] in q's dtype.
    The products are reduced over Dh and then S directly instead of through two dots, for
    which XLA would first transpose k and v into [B, Hkv, ., .] copies: per step, per layer,
    a write and a read of the whole cache. Sums in f32, softmax in f32 as in the prefill path.
    """
    b, _, h, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, 1, hkv, h // hkv, dh).astype(jnp.float32)  # broadcasts over S
    scores = jnp.sum(qg * k[:, :, :, None, :].astype(jnp.float32), axis=-1) * (
        1.0 / math.sqrt(dh)
    )  # [B, S, Hkv, G]
    scores = jnp.where(mask[:, 0, :, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(
        probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1
    )  # [B, Hkv, G, Dh]
    return out.reshape(b, 1, h, dh).astype(q.dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta  # frequencies are trace-time constants, not state
        self.mrope_section = cfg.mrope_section
        self.mrope_interleaved = cfg.mrope_interleaved
        lin = lambda din, dout, bias: nnx.Linear(
            din, dout, use_bias=bias, dtype=dt, param_dtype=dt, rngs=rngs
        )
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = lin(cfg.hidden_size, self.num_heads * self.head_dim, qkv_bias)
        self.k_proj = lin(cfg.hidden_size, self.num_kv_heads * self.head_dim, qkv_bias)
        self.v_proj = lin(cfg.hidden_size, self.num_kv_heads * self.head_dim, qkv_bias)
        self.o_proj = lin(self.num_heads * self.head_dim, cfg.hidden_size, cfg.attention_bias)
        norm = lambda: RMSNorm(self.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None
        self.q_norm, self.k_norm = norm(), norm()

    def _head_norm(self, norm: RMSNorm | None, x: jax.Array) -> jax.Array:
        return x if norm is None else norm(x)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int | None = None,
        query_row: bool = False,
        last_only: bool = False,
        causal_prompt: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [B, L, D]; positions: [B, L] or [3, B, L] (M-RoPE); mask: bool [B, L, S].

        `query_row`: also return `last_query_attention` (f32 [B, S]) and this call's keys after
        RoPE ([B, L, Hkv, Dh], what in-LLM pruning methods read) as third and fourth elements.
        `last_only`: keys and values for every position, but only the last position queries:
        the output is [B, 1, D] (a prefill's last layer, whose other outputs nobody reads).
        `causal_prompt`: x is a whole prompt written at slot 0 of an empty cache and `mask`
        is causal, so the queries attend over x's own keys by blocks (`causal_prompt_attention`).

        Without `kv`, S == L (attend within x). With `kv` = (k, v) each [B, S, Hkv, Dh],
        the new keys/values are written at slots [cache_index, cache_index + L) and the
        queries attend over all S slots; the updated (k, v) is returned. The caller must
        keep cache_index + L <= S (dynamic_update_slice would clamp, not fail).
        """
        b, seq, _ = x.shape
        inv_freq = rope_inverse_frequencies(self.head_dim, self.rope_theta)
        if last_only:  # keys and values from every position, queries from the last
            queries, query_positions, mask = x[:, -1:], positions[..., -1:], mask[:, -1:]
        else:
            queries, query_positions = x, positions
        lq = queries.shape[1]
        q = apply_rope(
            self._head_norm(
                self.q_norm, self.q_proj(queries).reshape(b, lq, self.num_heads, self.head_dim)
            ),
            query_positions,
            inv_freq,
            self.mrope_section,
            self.mrope_interleaved,
        )
        k = apply_rope(
            self._head_norm(
                self.k_norm, self.k_proj(x).reshape(b, seq, self.num_kv_heads, self.head_dim)
            ),
            positions,
            inv_freq,
            self.mrope_section,
            self.mrope_interleaved,
        )
        v = self.v_proj(x).reshape(b, seq, self.num_kv_heads, self.head_dim)
        new_keys = k
        if kv is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        if (
            kv is not None and lq == 1 and not query_row
        ):  # one query per row: a decode step, or `last_only`
            out = decode_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        elif causal_prompt:  # the cache's slots past the prompt are empty: only its own keys count
            out = causal_prompt_attention(
                q, k[:, :seq].astype(q.dtype), v[:, :seq].astype(q.dtype), mask[:, :, :seq]
            )
        else:
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        if query_row:
            return (
                self.o_proj(out.reshape(b, lq, -1)),
                kv,
                last_query_attention(q, k.astype(q.dtype), mask),
                new_keys,
            )
        return self.o_proj(out.reshape(b, lq, -1)), kv


class GatedMLP(nnx.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): LLaMA's MLP, and Qwen2.5-VL's tower MLP."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act: str,
        use_bias: bool,
        dtype: str,
        *,
        rngs: nnx.Rngs,
    ):
        dt = dtype_of(dtype)
        lin = lambda din, dout: nnx.Linear(
            din, dout, use_bias=use_bias, dtype=dt, param_dtype=dt, rngs=rngs
        )
        self.act = activation(act)
        self.gate_proj = lin(hidden_size, intermediate_size)
        self.up_proj = lin(hidden_size, intermediate_size)
        self.down_proj = lin(intermediate_size, hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaMLP(GatedMLP):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            cfg.mlp_bias,
            cfg.dtype,
            rngs=rngs,
        )


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(
        self,
        x,
        positions,
        mask,
        kv=None,
        cache_index=None,
        query_row: bool = False,
        last_only: bool = False,
        causal_prompt: bool = False,
    ):
        """-> (x, kv), or (x, kv, last-query attention row f32 [B, S], keys [B, L, Hkv, Dh]) with `query_row`.
        `last_only`: x comes back as its last position only, [B, 1, D]; `causal_prompt`: see LlamaAttention."""
        attn, kv, *row = self.self_attn(
            self.input_layernorm(x),
            positions,
            mask,
            kv,
            cache_index,
            query_row,
            last_only,
            causal_prompt,
        )
        x = (x[:, -1:] if last_only else x) + attn
        return (x + self.mlp(self.post_attention_layernorm(x)), kv, *row)


class DeepStackInput(NamedTuple):
    """Visual features added to the hidden states after decoder layer `layer` (DeepStack).

    `positions` says where, in one of two forms: int [B, N], the sequence position of each
    feature row (negative: the row is skipped); or bool [B, L], the visual positions, the
    k-th of row b taking features[b, k] (transformers' `visual_pos_masks`; N must be at
    least each row's count).
    """

    layer: int  # static: the decoder layer after which the features are added
    features: jax.Array  # [B, N, D]
    positions: jax.Array  # int [B, N] or bool [B, L]


def add_visual_features(hidden: jax.Array, features: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden [B, L, D] plus `features` [B, N, D] at `positions` (see `DeepStackInput`)."""
    features = features.astype(hidden.dtype)
    if positions.dtype == jnp.bool_:
        order = jnp.clip(jnp.cumsum(positions, axis=1) - 1, 0, features.shape[1] - 1)
        gathered = jnp.take_along_axis(features, order[..., None], axis=1)
        # where(), not a multiply: hidden stays bit-exact off the visual positions
        return hidden + jnp.where(positions[..., None], gathered, jnp.zeros((), hidden.dtype))
    rows = jnp.arange(hidden.shape[0])[:, None]
    index = jnp.where(positions >= 0, positions, hidden.shape[1])  # out of range: dropped
    return hidden.at[rows, index].add(features, mode="drop")


class LlamaModel(nnx.Module):
    """Embedding table, decoder layers and final norm (no head)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        mask: jax.Array | tuple[jax.Array, ...],
        cache: KVCache | None = None,
        cache_index: jax.Array | int | tuple | None = None,
        deepstack: Sequence[DeepStackInput] = (),
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds: [B, L, D]; positions: int [B, L] or [3, B, L] (M-RoPE); mask: bool
        [B, L, S], or one per layer when the layers' caches differ in length S_i (then
        `cache_index` is one slot per layer too); `deepstack`: features added after
        their layers (positions relative to inputs_embeds).

        Returns (final-normed hidden states [B, L, D], updated cache or None).
        """
        per_layer = lambda value, i: value[i] if isinstance(value, (tuple, list)) else value  # noqa: E731
        bad = [d.layer for d in deepstack if not 0 <= d.layer < len(self.layers)]
        if bad:
            raise ValueError(f"DeepStack layers {bad} out of range for {len(self.layers)} layers")
        x = inputs_embeds.astype(self.embed_tokens.embedding.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = layer(x, positions, per_layer(mask, i), kv, per_layer(cache_index, i))
            for level in deepstack:
                if level.layer == i:
                    x = add_visual_features(x, level.features, level.positions)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return self.norm(x), None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.config = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Linear(
                cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs
            )
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int [B, L] -> [B, L, D]."""
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [..., D] -> f32 logits [..., V]."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Full-sequence forward (no cache): int [B, L] -> f32 logits [B, L, V]."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden, _ = self.model(
            self.embed(input_ids),
            positions_from_mask(attention_mask),
            padding_causal_mask(attention_mask),
        )
        return self.logits(hidden)
