"""Bytes: the KV cache, the decoder's weights and the per-device split on a mesh.

KV cache = 2 (k and v) * layers * batch * length * hkv * dh * kv_dtype_bytes; weights =
parameter count * the config's dtype size (the vision tower's and projector's counts are
the family's estimate hooks). `model_mesh_bytes` splits a model's parameters by its
sharding rules (`zspa_jax.estimate.model.mesh_bytes` finds them from a config's family).
"""

from __future__ import annotations

import numpy as np

from models.checkpoint import flatten, param_template
from models.layers import dtype_of
from models.llama import LlamaConfig
from zspa_jax import sharding

__all__ = ["decode_weight_bytes", "dtype_bytes", "kv_cache_bytes", "model_mesh_bytes"]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a config's dtype name."""
    return np.dtype(dtype_of(dtype)).itemsize


def _numel_decoder_layer(t: LlamaConfig) -> int:
    h, hkv, dh, d, m = (
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.hidden_size,
        t.intermediate_size,
    )
    attn = d * (h * dh + 2 * hkv * dh) + h * dh * d
    if t.attention_bias:
        attn += h * dh + 2 * hkv * dh + d
    elif t.qkv_bias:
        attn += h * dh + 2 * hkv * dh
    mlp = 3 * d * m + ((2 * m + d) if t.mlp_bias else 0)
    return attn + mlp + 2 * d


def _numel_llm(t: LlamaConfig) -> int:
    embed = t.vocab_size * t.hidden_size
    head = 0 if t.tie_word_embeddings else t.hidden_size * t.vocab_size
    return embed + t.num_hidden_layers * _numel_decoder_layer(t) + t.hidden_size + head


def decode_weight_bytes(t: LlamaConfig, bytes_per: int) -> int:
    """Weights read once per decode step: every decoder layer, the final norm, the head (the
    whole tied embedding table when tied) and one embedding row."""
    head = t.hidden_size * t.vocab_size
    return (
        t.num_hidden_layers * _numel_decoder_layer(t) + t.hidden_size + head + t.hidden_size
    ) * bytes_per


def kv_cache_bytes(t: LlamaConfig, batch: int, length: int, dtype_bytes: int) -> int:
    return (
        2 * t.num_hidden_layers * batch * length * t.num_key_value_heads * t.head_dim * dtype_bytes
    )


def _kv_bytes(
    t: LlamaConfig,
    batch: int,
    length: int,
    dtype_bytes: int,
    inside_llm: bool,
    dropped: int,
    layer: int,
) -> int:
    """KV cache of `length` slots; a method pruning inside the LLM leaves the `dropped`
    visual tokens in the caches of layers < `layer` too."""
    extra = (
        layer * 2 * batch * dropped * t.num_key_value_heads * t.head_dim * dtype_bytes
        if inside_llm
        else 0
    )
    return kv_cache_bytes(t, batch, length, dtype_bytes) + extra


def model_mesh_bytes(
    cfg,
    model_cls: type,
    axis_sizes: dict[str, int],
    batch: int,
    length: int,
    kv_dtype_bytes: int | None = None,
) -> dict:
    """Per-device bytes on a ("data", "model") mesh, as `zspa_jax.load(mesh=)` and
    `generate` place them: parameters of `model_cls` (the family's NNX model) by its rule
    table (`model_cls.SHARDING_RULES`; dims that do not divide are replicated), the KV
    cache of `batch` rows (padded to a multiple of "data") and `length` slots split over
    "data" and, when the KV heads divide it, over "model" (otherwise every "model" device
    holds all heads).

    Computed from the abstract parameter tree: no memory, no devices.
    """
    template = flatten(param_template(cfg, model_cls))
    shapes = {p: tuple(t.shape) for p, t in template.items()}
    plan = sharding.plan_params(shapes, model_cls.SHARDING_RULES, axis_sizes)
    itemsize = {p: np.dtype(t.dtype).itemsize for p, t in template.items()}
    t = cfg.text
    kvb = dtype_bytes(t.dtype) if kv_dtype_bytes is None else int(kv_dtype_bytes)
    data, model = axis_sizes["data"], axis_sizes["model"]
    rows = -(-batch // data)
    heads_split = model if t.num_key_value_heads % model == 0 else 1
    params = sharding.bytes_per_device(shapes, itemsize, plan, axis_sizes)
    kv = kv_cache_bytes(t, rows, length, kvb) // heads_split
    return {
        "mesh": dict(axis_sizes),
        "param_bytes_total": sum(int(np.prod(s)) * itemsize[p] for p, s in shapes.items()),
        "param_bytes_per_device": params,
        "kv_cache_bytes_per_device": kv,
        "bytes_per_device": params + kv,
        "rows_per_device": rows,
        "kv_heads_split": heads_split > 1 or model == 1,
        "replicated_dims": len(plan.replicated),
    }
