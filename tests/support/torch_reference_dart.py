"""Plain eager PyTorch DART selection: the oracle for zspa_jax.methods.dart.

Written after the official `get_retained_image_token` (github.com/ZichenWen1/DART,
`llava/model/language_model/modeling_llama_self.py`; the Qwen2.5-VL copy in
`Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py` is the same), one example at a
time with Python sets and lists as there, and with the same exact-K adaptation as the
JAX kernel (see its module docstring):

  * pivots in a fixed order (image pivots by ascending position, then text pivots by
    ascending position) instead of Python set order;
  * the budget keep - (image pivots) spread over the pivots, R // P each, one more for the
    first R % P;
  * every top-k with ties -> lower index (explicit sort on (-value, index));
  * padding slots of the span are never candidates nor pivots.

Unlike the kernel it applies the official final RMSNorm (w * x / sqrt(mean(x^2) + eps)) to
the hidden states when a norm weight is given, and uses torch's cosine_similarity, so a
match also checks that the kernel's "weight only" shortcut is exact.
"""

from __future__ import annotations

import numpy as np
import torch


def _topk_lower_index_first(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, ties -> lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def get_retained_image_token_reference(
    last_layer_state: torch.Tensor,
    k_states: torch.Tensor,
    image_token_start_index: int,
    image_token_length: int,
    text_positions: list[int],
    valid: list[bool],
    keep: int,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
) -> list[int]:
    """One example: last_layer_state [L, D] (already final-normed), k_states [L, Dk] (heads
    concatenated). Returns the kept image tokens as sorted *sequence positions*."""
    start, n = image_token_start_index, image_token_length
    image_positions = [start + i for i in range(n) if valid[i]]

    # Pivots: largest key L1 norms among the image tokens / the text tokens.
    k_states_image_token_L1_norm = torch.norm(k_states[image_positions, :], p=1, dim=-1).tolist()
    k_states_query_token_L1_norm = torch.norm(k_states[text_positions, :], p=1, dim=-1).tolist()
    n_text = min(pivot_text_token, len(text_positions))
    n_image = pivot_image_token if (pivot_image_token > 0 or n_text > 0) else 1
    n_image = min(n_image, keep, len(image_positions))
    image_indices = [
        image_positions[i] for i in _topk_lower_index_first(k_states_image_token_L1_norm, n_image)
    ]
    query_indices = [
        text_positions[i] for i in _topk_lower_index_first(k_states_query_token_L1_norm, n_text)
    ]
    indices_set = set(image_indices + query_indices)

    # Exact-K: the official TOKEN_TOPK per pivot becomes a quota summing to keep - n_image.
    pivots = sorted(image_indices) + sorted(query_indices)
    spare = keep - n_image
    quotas = [
        spare // len(pivots) + (1 if r < spare % len(pivots) else 0) for r in range(len(pivots))
    ]

    valid_indices = set(image_positions) - set(image_indices)
    for item, token_topk in zip(pivots, quotas):
        valid_indices_list = sorted(valid_indices)
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(
            last_layer_state[item, :], valid_vectors, dim=-1
        )
        top_k_indices = _topk_lower_index_first(cos_sim.tolist(), token_topk)
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)

    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2RMSNorm (in float32)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def dart_select_reference(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    visual_start: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    num_visual: int,
    keep: int,
    visual_valid: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    num_image_pivots: int = 4,
    num_text_pivots: int = 4,
) -> torch.Tensor:
    """Same arguments as `dart_select` on torch tensors -> int64 [B, keep], ascending span indices."""
    rows = []
    for b in range(hidden.shape[0]):
        state = hidden[b].float()
        if norm_weight is not None:
            state = rms_norm(state, norm_weight.float())
        k = keys[b].reshape(keys.shape[1], -1).float()
        start = int(visual_start[b])
        text_positions = [int(p) for p in torch.nonzero(text_mask[b]).flatten()]
        valid = [True] * num_visual if visual_valid is None else [bool(v) for v in visual_valid[b]]
        kept = get_retained_image_token_reference(
            state,
            k,
            start,
            num_visual,
            text_positions,
            valid,
            keep,
            num_image_pivots,
            num_text_pivots,
        )
        rows.append(torch.tensor([p - start for p in kept], dtype=torch.int64))
    return torch.stack(rows)


def hf_llava_dart_kept(tiny, ids, px, layer: int, keep: int, **pivots) -> np.ndarray:
    """The eager torch DART on a tiny transformers LLaVA's own internals (layer K-1's keys
    after RoPE, its output hidden states), with the given pivot counts -> int [B, keep]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = tiny.hf.model.language_model
    with torch.no_grad():
        out = tiny.hf(
            input_ids=torch.as_tensor(ids),
            pixel_values=torch.as_tensor(px),
            output_hidden_states=True,
        )
        attn = lm.layers[layer - 1].self_attn
        x = lm.layers[layer - 1].input_layernorm(out.hidden_states[layer - 1])
        b, length = ids.shape
        k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(x, torch.arange(length)[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        keys = k.transpose(1, 2).reshape(b, length, -1)
        start = torch.as_tensor(np.argmax(ids == tiny.image_token_index, axis=1))
        after = torch.arange(length)[None] >= start[:, None] + tiny.tokens_per_image
        text = after & torch.as_tensor((ids != tiny.pad_token_id) & (ids != tiny.bos_token_id))
        kept = dart_select_reference(
            out.hidden_states[layer],
            keys,
            start,
            text,
            num_visual=tiny.tokens_per_image,
            keep=keep,
            norm_weight=lm.norm.weight,
            **pivots,
        )
    return kept.numpy()
