"""FLOPs and memory estimator for LLaVA and Qwen2.5-VL models with ZSPAPrune pruning.

    python -m zspa_jax.estimate [--text-tokens 60] [--new-tokens 0] [--json]
    python -m zspa_jax.estimate --model qwen2.5-vl-7b --image 1344x1008 [--keep 1230 256 128 64]

prints, for LLaVA-1.5-7B (CLIP ViT-L/14-336 + LLaMA-2-7B), the cost of each stage at
keep in {576, 192, 128, 64}; or for Qwen2.5-VL-7B at one image size (its visual token
count follows the image: `estimate_qwen2_5_vl`, conventions at the end of this docstring).

Convention (every count below is in FLOPs = multiply-accumulates x 2):

* Only matrix products are counted (dense layers, attention scores and values, the patch
  convolution, the pruning dot products). Norms, softmax, activations, RoPE, residual adds
  and biases are left out: they are O(n*d + h*n^2) element-wise work against the
  O(n*d^2 + n^2*d) of the products, i.e. a few per cent at most for real widths
  (tests/test_estimate.py checks the total against XLA's own count).
* LLaMA decoder layer on n tokens with h query heads, hkv key/value heads of size dh,
  width d and SwiGLU width m, in multiply-accumulates:
      projections   n*d*(h*dh + 2*hkv*dh) + n*h*dh*d     (q, k, v, o)
      attention     2 * n * n * h * dh                   (scores Q K^T and probs V)
      SwiGLU MLP    3 * n * d * m                        (gate, up, down)
  Attention is counted over the full n x n square, NOT halved for causality: that is
  what a dense masked implementation (ours, transformers' eager/sdpa on CPU) computes.
  For MHA (h*dh = hkv*dh = d) a layer is 4*n*d^2 + 2*n^2*d + 3*n*d*m MACs.
* CLIP encoder layer on n_v = patches (+1 CLS) tokens: 4*n_v*d^2 + 2*n_v^2*d + 2*n_v*d*m
  MACs (two-layer MLP), plus the patch convolution patches * (C*p*p) * d once. Only the
  layers up to LLaVA's `vision_feature_layer` run (-2: all but the last).
* Projector: N * (d_vision*n_layers * d + d * d) MACs (linear_1, linear_2).
* Pruning (ZSPAPrune, `select_tokens`) with N visual tokens of width D, keep K, core
  k = round(K*r), T prompt tokens: unit vectors 3*N*D FLOPs (square, sum, divide), the
  prompt mean 2*T*D, relevance N*D MACs, core similarities N*k*D MACs and the greedy fill
  (K - k) * N*D MACs, i.e. about 2*N*D*(K + 1) + 3*N*D + 2*T*D FLOPs in all (O(K*N*D));
  r = 0 (DivPrune) adds the N*N*D MACs of its first pick. keep = N means no pruning: 0.
* The other methods' own selection cost (`method_flops`, same convention, unit vectors
  counted as 3*N*D like above, keep = N: 0), from what zspa_jax.methods computes:
      relevance (r = 1)  3*N*D + 2*T*D + 2*N*D           (unit vectors, prompt mean, top-k)
      divprune (r = 0)   pruning_flops(r = 0): 2*N*N*D + 2*(K - 1)*N*D + 3*N*D
      zspaprune "auto"   3*N*D + 2*T*D + 2*N*D + 2*K*N*D (+ 2*N*N*D when its k is 0)
                         one N x D matvec per pick, core picks included; the median/MAD
                         are sorts (0). The N x N pick runs only for examples whose k = 0
                         (`auto_zero_share` of them; a vmapped batch computes it always).
      cdpruner           3*N*D + 2*T*D + 2*N*D + 2*K*N*(D + K)
                         per pick one kernel row L[j, :] (N*D MACs) and the Cholesky
                         projection over the whole [K, N] buffer (K*N MACs).
      vispruner          3*N*C + 2*N*N*C   (C = tower width; one N x N cosine matrix, the
                         duplicate-removal rounds only gather from it and sort)
      visionzip          3*L*Dh + 2*(M - c)*c*(Dh + C)   (L = N + 1 tower tokens with
                         [CLS], c contextual, M = L - dominant; cosine of the keys (width
                         Dh) of the M - c merged tokens to the c targets, then the one-hot
                         assignment matrix times their hidden states (width C))
      random, uniform    0 (top-k of noise / a constant)
      fastv              0 for the selection (a top-k over one attention row); its cost
                         is in the LLM: layers < fastv_layer run on all T + N tokens,
                         the others on T + K (`fastv_prefill_flops`, what `estimate`
                         reports as LLM prefill for method="fastv"; its decode and KV
                         cache follow the same split).
  VisionZip hands the projector its K tokens only, so `estimate` counts the projector
  on K rows for it.
* LLM prefill: the decoder on the (pruned) prompt of L' = T + K tokens plus the LM head
  on the last position only (d*V MACs; what `generate` computes).
* Decode: one token attending to its context c: projections + 2*c*h*dh attention + MLP +
  head; `decode_flops_per_token` is the mean over `new_tokens` steps (context L'..L'+n-1),
  or the first step's cost when new_tokens = 0. Implementations that attend over a
  preallocated cache (zspa_jax does, over `cache_length` slots) do more attention work
  than this ideal count.
* Bytes: KV cache = 2 (k and v) * layers * batch * (L' + new_tokens) * hkv * dh *
  kv_dtype_bytes; weights = parameter count * the config's dtype size.

Everything scales with `batch` except weight bytes.

Qwen2.5-VL (`estimate_qwen2_5_vl`): the image is resized like the Qwen2-VL image
processor (smart_resize: sides multiples of patch*merge, pixels within min/max), giving a
grid of P = h*w patches and N = P/4 visual tokens. Vision block on P patches of width d,
SwiGLU width m: 4*P*d^2 (qkv, proj) + 3*P*d*m (MLP) + attention 2*sum(s^2)*d over its
segments s (each window of up to 64 patches for windowed blocks, the whole image for the
`fullatt_block_indexes`) — the ideal count, what transformers computes per window; our
tower pads partial windows to 64 slots. Patch embedding P*(3*2*p*p)*d; merger
N*((4d)^2 + 4d*d_llm). The LLM is the shared decoder count with L' = T + K.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import sys

from models.clip import CLIPVisionConfig
from models.layers import dtype_of
from models.llama import LlamaConfig
from models.llava import LlavaConfig
from models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from zspa_jax.methods import get_method

__all__ = [
    "clip_layer_macs",
    "decoder_layer_macs",
    "estimate",
    "llava_1_5_7b_config",
    "LLAVA_1_5_7B",
    "pruning_flops",
    "method_flops",
    "fastv_prefill_flops",
    "estimate_qwen2_5_vl",
    "qwen2_5_vl_7b_config",
    "qwen_image_grid",
]


def llava_1_5_7b_config(dtype: str = "float16") -> LlavaConfig:
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 (24 layers, d 1024, m 4096,
    16 heads, 577 tokens, feature layer -2) -> projector 1024 -> 4096 -> 4096 (gelu) ->
    LLaMA-2-7B (32 layers, d 4096, m 11008, 32 heads, vocab 32064)."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        dtype=dtype,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        dtype=dtype,
    )
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


LLAVA_1_5_7B = llava_1_5_7b_config()


def llava_1_5_13b_config(dtype: str = "float16") -> LlavaConfig:
    """LLaVA-1.5-13B (llava-hf/llava-1.5-13b-hf): the 7B's tower, projector 1024 -> 5120 ->
    5120, LLaMA-2-13B (40 layers, d 5120, m 13824, 40 heads, vocab 32064)."""
    cfg = llava_1_5_7b_config(dtype)
    text = dataclasses.replace(
        cfg.text, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, head_dim=None,
    )
    return dataclasses.replace(cfg, text=text)


# ----------------------------------------------------------------------------- per-component


def decoder_layer_macs(t: LlamaConfig, n: int, kv_len: int | None = None) -> int:
    """MACs of one LLaMA layer for n query tokens attending to kv_len keys (default n)."""
    kv_len = n if kv_len is None else kv_len
    h, hkv, dh, d, m = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size, t.intermediate_size
    projections = n * d * (h * dh + 2 * hkv * dh) + n * h * dh * d
    attention = 2 * n * kv_len * h * dh
    mlp = 3 * n * d * m
    return projections + attention + mlp


def clip_layer_macs(v: CLIPVisionConfig, n: int) -> int:
    """MACs of one CLIP encoder layer on n tokens (MHA, two-layer MLP)."""
    d, m = v.hidden_size, v.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def vision_layers_run(cfg: LlavaConfig) -> int:
    """Encoder layers LLaVA actually runs: up to the deepest `vision_feature_layer`."""
    n_states = cfg.vision.num_hidden_layers + 1
    return max(layer % n_states for layer in cfg.feature_layers)


def vision_flops(cfg: LlavaConfig) -> int:
    """FLOPs of the tower for one image: patch conv + the encoder layers that run."""
    v = cfg.vision
    patches = v.num_patches
    conv = patches * v.num_channels * v.patch_size * v.patch_size * v.hidden_size
    return 2 * (conv + vision_layers_run(cfg) * clip_layer_macs(v, patches + 1))


def projector_flops(cfg: LlavaConfig, n: int | None = None) -> int:
    """Projector on n tokens (default: the image's N)."""
    n = cfg.image_seq_length if n is None else n
    din = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    return 2 * n * (din * d + d * d)


def pruning_flops(n: int, d: int, keep: int, text_tokens: int, core_ratio: float = 0.6) -> int:
    """FLOPs of `select_tokens(method="zspaprune")` for one example (0 when keep == n)."""
    return method_flops("zspaprune", n, d, keep, text_tokens, core_ratio)


def method_flops(
    method: str,
    n: int,
    d: int,
    keep: int,
    text_tokens: int,
    core_ratio: float | str = 0.6,
    *,
    key_dim: int | None = None,
    auto_zero_share: float = 1.0,
) -> int:
    """FLOPs of one example's token selection by `method` (its record's `flops`; the module
    docstring lists each formula).

    n: visual tokens N; d: the width the method reads (the LLM width D for the
    embedding-stage methods, the tower width C for the tower-stage ones); key_dim: the
    tower's head width Dh ("visionzip"; default d); core_ratio: the core ratio or "auto";
    auto_zero_share: expected share of examples whose automatic core is empty (1 = the
    worst case, what a vmapped batch computes). Methods inside the LLM count their
    selection only; their saving is in the LLM prefill (`fastv_prefill_flops`).
    """
    record = get_method(method)
    return int(record.flops(n, d, keep, text_tokens, core_ratio=core_ratio, key_dim=key_dim,
                            auto_zero_share=auto_zero_share))


def fastv_prefill_flops(
    t: LlamaConfig, text_tokens: int, n: int, keep: int, layer: int = 2, logits_positions: int = 1
) -> int:
    """FastV's LLM prefill (one sequence): layers < `layer` on T + N tokens, the rest on T + K."""
    early, late = text_tokens + n, text_tokens + keep
    layers = t.num_hidden_layers
    macs = layer * decoder_layer_macs(t, early) + (layers - layer) * decoder_layer_macs(t, late)
    return 2 * (macs + logits_positions * t.hidden_size * t.vocab_size)


def llm_prefill_flops(t: LlamaConfig, n: int, kv_len: int | None = None, logits_positions: int = 1) -> int:
    """Decoder on n tokens + the LM head on `logits_positions` positions (one sequence)."""
    return 2 * (t.num_hidden_layers * decoder_layer_macs(t, n, kv_len) + logits_positions * t.hidden_size * t.vocab_size)


def decode_flops(t: LlamaConfig, context: int) -> int:
    """One decode step: one new token attending to `context` cached tokens (itself included)."""
    return 2 * (t.num_hidden_layers * decoder_layer_macs(t, 1, context) + t.hidden_size * t.vocab_size)


def _numel_vision(v: CLIPVisionConfig) -> int:
    d, m = v.hidden_size, v.intermediate_size
    embeddings = d + v.num_channels * v.patch_size**2 * d + (v.num_patches + 1) * d
    layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d
    return embeddings + 2 * 2 * d + v.num_hidden_layers * layer  # pre/post layer norms


def _numel_projector(cfg: LlavaConfig) -> int:
    din = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    bias = cfg.multimodal_projector_bias
    return din * d + d * d + (2 * d if bias else 0)


def _numel_decoder_layer(t: LlamaConfig) -> int:
    h, hkv, dh, d, m = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size, t.intermediate_size
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


def kv_cache_bytes(t: LlamaConfig, batch: int, length: int, dtype_bytes: int) -> int:
    return 2 * t.num_hidden_layers * batch * length * t.num_key_value_heads * t.head_dim * dtype_bytes


def _kv_bytes(t: LlamaConfig, batch: int, length: int, dtype_bytes: int, inside_llm: bool, dropped: int,
              layer: int) -> int:
    """KV cache of `length` slots; a method pruning inside the LLM leaves the `dropped`
    visual tokens in the caches of layers < `layer` too."""
    extra = layer * 2 * batch * dropped * t.num_key_value_heads * t.head_dim * dtype_bytes if inside_llm else 0
    return kv_cache_bytes(t, batch, length, dtype_bytes) + extra


# ----------------------------------------------------------------------------- the estimate


def estimate(
    cfg: LlavaConfig,
    text_tokens: int,
    keep: int | None = None,
    new_tokens: int = 0,
    batch: int = 1,
    kv_dtype_bytes: int | None = None,
    core_ratio: float | str = 0.6,
    method: str = "zspaprune",
    fastv_layer: int = 2,
) -> dict:
    """FLOPs per stage and bytes for one LLaVA call (see the module docstring for the convention).

    Args:
      cfg: a `models.llava.LlavaConfig`.
      text_tokens: T, text tokens of the prompt (everything but the image placeholders).
      keep: K visual tokens kept (None = all N, no pruning).
      new_tokens: tokens generated after the prompt (sizes the KV cache and the decode cost).
      batch: B prompts (one image each).
      kv_dtype_bytes: bytes per KV-cache element (default: the decoder's dtype).
      core_ratio: ZSPAPrune's r or "auto" (only the pruning cost depends on it).
      method: the pruning method (`method_flops`); "fastv" changes the LLM prefill, decode
        and KV cache instead (layers < fastv_layer keep all N tokens).
    Returns a flat dict of ints/floats (FLOPs, bytes, token counts).
    """
    n = cfg.image_seq_length
    keep = n if keep is None else int(keep)
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}] (visual tokens), got {keep}")
    if text_tokens < 0 or new_tokens < 0 or batch < 1:
        raise ValueError(f"need text_tokens >= 0, new_tokens >= 0, batch >= 1; got {text_tokens}, {new_tokens}, {batch}")
    t = cfg.text
    weight_bytes_per = np.dtype(dtype_of(t.dtype)).itemsize
    vision_bytes_per = np.dtype(dtype_of(cfg.vision.dtype)).itemsize
    kv_bytes_per = weight_bytes_per if kv_dtype_bytes is None else int(kv_dtype_bytes)
    length = text_tokens + keep
    length_full = text_tokens + n

    vision = batch * vision_flops(cfg)
    # A method merging in tower space hands the projector only its K tokens.
    record = get_method(method)
    projector = batch * projector_flops(cfg, keep if record.stage == "tower" and record.merges else None)
    pruning, prefill, prefill_full, decode_total, decode_per_token = _language_model_flops(
        t, n, keep, text_tokens, new_tokens, batch, core_ratio, method, fastv_layer,
        tower_dims=(cfg.vision.hidden_size, cfg.vision.hidden_size // cfg.vision.num_attention_heads),
    )

    w_vision = _numel_vision(cfg.vision) * vision_bytes_per
    w_projector = _numel_projector(cfg) * weight_bytes_per
    w_llm = _numel_llm(t) * weight_bytes_per
    # Read once per decode step: every decoder layer, the final norm, the head (the whole
    # tied embedding table when tied) and one embedding row.
    head = t.hidden_size * t.vocab_size
    decode_weight_bytes = (
        t.num_hidden_layers * _numel_decoder_layer(t) + t.hidden_size + head + t.hidden_size
    ) * weight_bytes_per
    kv = _kv_bytes(t, batch, length + new_tokens, kv_bytes_per, record.llm_layer, n - keep, fastv_layer)

    return {
        "batch": batch,
        "visual_tokens": n,
        "kept_tokens": keep,
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "sequence_length": length,
        "sequence_length_unpruned": length_full,
        "vision_tokens_in_tower": cfg.vision.num_patches + 1,
        "vision_layers_run": vision_layers_run(cfg),
        "vision_flops": vision,
        "projector_flops": projector,
        "pruning_flops": pruning,
        "llm_prefill_flops": prefill,
        "llm_prefill_flops_unpruned": prefill_full,
        "prefill_reduction": prefill_full / prefill,
        "prefill_flops_total": vision + projector + pruning + prefill,
        "prefill_flops_total_unpruned": vision + projector + prefill_full,
        "decode_flops_per_token": decode_per_token,
        "decode_flops_total": decode_total,
        "kv_cache_bytes": kv,
        "kv_cache_bytes_unpruned": kv_cache_bytes(t, batch, length_full + new_tokens, kv_bytes_per),
        "kv_cache_bytes_per_token": kv_cache_bytes(t, 1, 1, kv_bytes_per),
        "weight_bytes": w_vision + w_projector + w_llm,
        "weight_bytes_vision": w_vision,
        "weight_bytes_projector": w_projector,
        "weight_bytes_llm": w_llm,
        "decode_weight_bytes_per_token": decode_weight_bytes,
    }


# ----------------------------------------------------------------------------- Qwen2.5-VL


def qwen2_5_vl_7b_config(dtype: str = "bfloat16", text_layers: int = 28, vision_depth: int = 32) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct: ViT 32 blocks (d 1280, m 3420, 16 heads, patch 14, window
    112, full attention at 7/15/23/31) -> merger -> Qwen2-7B (28 layers, d 3584, m 18944,
    28 heads / 4 KV heads, vocab 152064, M-RoPE [16, 24, 24]). Fewer layers on request
    (full-attention blocks kept at the same relative depths)."""
    full = tuple(sorted({min(vision_depth - 1, round((i + 1) * vision_depth / 4) - 1) for i in range(4)}))
    vision = Qwen2_5_VLVisionConfig(
        depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=full,
        out_hidden_size=3584, dtype=dtype,
    )
    text = LlamaConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=128000, qkv_bias=True, mrope_section=(16, 24, 24), dtype=dtype,
    )
    return Qwen2_5_VLConfig(vision=vision, text=text)


def qwen2_5_vl_72b_config(dtype: str = "bfloat16") -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-72B-Instruct: the 7B's ViT with MLP width 3456 and merger output 8192 ->
    Qwen2-72B (80 layers, d 8192, m 29568, 64 heads / 8 KV heads, vocab 152064)."""
    cfg = qwen2_5_vl_7b_config(dtype)
    vision = dataclasses.replace(cfg.vision, intermediate_size=3456, out_hidden_size=8192)
    text = dataclasses.replace(
        cfg.text, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=None,
    )
    return Qwen2_5_VLConfig(vision=vision, text=text)


def qwen_image_grid(
    height: int, width: int, v: Qwen2_5_VLVisionConfig, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(h, w) in patches of an image of height x width pixels after the Qwen2-VL image
    processor's smart_resize (its defaults for min/max pixels)."""
    factor = v.patch_size * v.spatial_merge_size
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h // v.patch_size, w // v.patch_size


def _qwen_window_sizes(gh: int, gw: int, v: Qwen2_5_VLVisionConfig) -> list[int]:
    """Patches per window of an image of gh x gw patches (edge windows smaller)."""
    m, win = v.spatial_merge_size, v.window_merged
    mh, mw = gh // m, gw // m
    rows = [min(win, mh - i) for i in range(0, mh, win)]
    cols = [min(win, mw - j) for j in range(0, mw, win)]
    return [r * c * m * m for r in rows for c in cols]


def qwen_vision_flops(cfg: Qwen2_5_VLConfig, gh: int, gw: int) -> int:
    """FLOPs of the tower + merger for one image of gh x gw patches."""
    v = cfg.vision
    p, d, m = gh * gw, v.hidden_size, v.intermediate_size
    windows = _qwen_window_sizes(gh, gw, v)
    dense = 4 * p * d * d + 3 * p * d * m
    macs = p * v.patch_dim * d
    for i in range(v.depth):
        attention = 2 * p * p * d if i in v.fullatt_block_indexes else 2 * sum(s * s for s in windows) * d
        macs += dense + attention
    n = p // v.merge_unit
    width = d * v.merge_unit
    macs += n * (width * width + width * v.out_hidden_size)
    return 2 * macs


def _numel_qwen_vision(v: Qwen2_5_VLVisionConfig) -> int:
    d, m = v.hidden_size, v.intermediate_size
    block = (3 * d * d + 3 * d) + (d * d + d) + (3 * d * m + 2 * m + d) + 2 * d
    width = d * v.merge_unit
    merger = d + width * width + width + width * v.out_hidden_size + v.out_hidden_size
    return v.patch_dim * d + v.depth * block + merger


def _language_model_flops(
    t,
    n: int,
    keep: int,
    text_tokens: int,
    new_tokens: int,
    batch: int,
    core_ratio: float | str,
    method: str = "zspaprune",
    fastv_layer: int = 2,
    tower_dims: tuple[int, int] | None = None,
):
    """(pruning, LLM prefill, unpruned LLM prefill, decode total, decode per token) FLOPs for
    a batch whose prompts hold `text_tokens` text tokens and keep `keep` of `n` visual tokens.
    tower_dims: (tower width, head width) read by the [CLS]-attention methods."""
    length = text_tokens + keep
    record = get_method(method)
    width, key_dim = tower_dims if record.stage == "tower" else (t.hidden_size, None)
    pruning = batch * method_flops(method, n, width, keep, text_tokens, core_ratio, key_dim=key_dim)
    fastv = record.llm_layer and keep < n  # early layers keep all N tokens
    if fastv:
        prefill = batch * fastv_prefill_flops(t, text_tokens, n, keep, fastv_layer)
    else:
        prefill = batch * llm_prefill_flops(t, length)
    prefill_full = batch * llm_prefill_flops(t, text_tokens + n)

    def step(i: int) -> int:  # decode step i: FastV's early layers still attend over all N
        if not fastv:
            return decode_flops(t, length + i + 1)
        early = fastv_layer * decoder_layer_macs(t, 1, text_tokens + n + i + 1)
        late = (t.num_hidden_layers - fastv_layer) * decoder_layer_macs(t, 1, length + i + 1)
        return 2 * (early + late + t.hidden_size * t.vocab_size)

    if not new_tokens:
        return pruning, prefill, prefill_full, 0, float(step(0))
    decode_total = batch * sum(step(i) for i in range(new_tokens))
    return pruning, prefill, prefill_full, decode_total, decode_total / (batch * new_tokens)


def estimate_qwen2_5_vl(
    cfg: Qwen2_5_VLConfig,
    text_tokens: int,
    image_hw: tuple[int, int],
    keep: int | None = None,
    new_tokens: int = 0,
    batch: int = 1,
    kv_dtype_bytes: int | None = None,
    core_ratio: float | str = 0.6,
    method: str = "zspaprune",
    fastv_layer: int = 2,
) -> dict:
    """FLOPs per stage and bytes for one Qwen2.5-VL call on an image of image_hw = (height,
    width) pixels (see the module docstring). Same keys as `estimate`, plus the grid.
    Methods that need the tower's [CLS] token are refused: this tower has none."""
    if get_method(method).needs_cls_attention:
        raise ValueError(f"method {method!r} needs a [CLS] token, which the Qwen2.5-VL tower does not have")
    gh, gw = qwen_image_grid(*image_hw, cfg.vision)
    n = gh * gw // cfg.vision.merge_unit
    keep = n if keep is None else int(keep)
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}] (visual tokens of a {image_hw} image), got {keep}")
    t = cfg.text
    wb = np.dtype(dtype_of(t.dtype)).itemsize
    kvb = wb if kv_dtype_bytes is None else int(kv_dtype_bytes)
    length, length_full = text_tokens + keep, text_tokens + n
    vision = batch * qwen_vision_flops(cfg, gh, gw)
    pruning, prefill, prefill_full, decode_total, decode_per_token = _language_model_flops(
        t, n, keep, text_tokens, new_tokens, batch, core_ratio, method, fastv_layer
    )
    w_vision = _numel_qwen_vision(cfg.vision) * np.dtype(dtype_of(cfg.vision.dtype)).itemsize
    w_llm = _numel_llm(t) * wb
    return {
        "batch": batch,
        "image_hw": list(image_hw),
        "grid_hw": [gh, gw],
        "visual_tokens": n,
        "kept_tokens": keep,
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "sequence_length": length,
        "sequence_length_unpruned": length_full,
        "vision_tokens_in_tower": gh * gw,
        "vision_flops": vision,
        "projector_flops": 0,  # the merger is counted in vision_flops
        "pruning_flops": pruning,
        "llm_prefill_flops": prefill,
        "llm_prefill_flops_unpruned": prefill_full,
        "prefill_reduction": prefill_full / prefill,
        "prefill_flops_total": vision + pruning + prefill,
        "prefill_flops_total_unpruned": vision + prefill_full,
        "decode_flops_per_token": decode_per_token,
        "decode_flops_total": decode_total,
        "kv_cache_bytes": _kv_bytes(t, batch, length + new_tokens, kvb, get_method(method).llm_layer, n - keep,
                                    fastv_layer),
        "kv_cache_bytes_unpruned": kv_cache_bytes(t, batch, length_full + new_tokens, kvb),
        "kv_cache_bytes_per_token": kv_cache_bytes(t, 1, 1, kvb),
        "weight_bytes": w_vision + w_llm,
        "weight_bytes_vision": w_vision,
        "weight_bytes_projector": 0,
        "weight_bytes_llm": w_llm,
    }


# ----------------------------------------------------------------------------- meshes


def mesh_bytes(cfg, axis_sizes: dict[str, int], batch: int, length: int, kv_dtype_bytes: int | None = None) -> dict:
    """Per-device bytes on a ("data", "model") mesh, as `zspa_jax.load(mesh=)` and
    `generate` place them: parameters by the family's rule table (models.*.SHARDING_RULES;
    dims that do not divide are replicated), the KV cache of `batch` rows (padded to a
    multiple of "data") and `length` slots split over "data" and, when the KV heads divide
    it, over "model" (otherwise every "model" device holds all heads).

    Computed from the abstract parameter tree: no memory, no devices.
    """
    from models.checkpoint import flatten, param_template
    from zspa_jax import sharding
    from zspa_jax.families import family_of

    family = family_of(cfg)
    template = flatten(param_template(cfg, family.model_cls))
    shapes = {p: tuple(t.shape) for p, t in template.items()}
    plan = sharding.plan_params(shapes, family.sharding_rules, axis_sizes)
    itemsize = {p: np.dtype(t.dtype).itemsize for p, t in template.items()}
    t = cfg.text
    kvb = np.dtype(dtype_of(t.dtype)).itemsize if kv_dtype_bytes is None else int(kv_dtype_bytes)
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


def _mesh_table(name: str, cfg, axis_sizes, batch: int, text_tokens: int, new_tokens: int,
                visual_tokens: int, keeps) -> tuple[str, list[dict]]:
    rows = []
    for keep in keeps:
        r = mesh_bytes(cfg, axis_sizes, batch, text_tokens + keep + new_tokens)
        rows.append({"model": name, "batch": batch, "kept_tokens": keep, "visual_tokens": visual_tokens, **r})
    gib = 2**30
    mesh = f"data={axis_sizes['data']},model={axis_sizes['model']}"
    head = f"| model | mesh | batch | keep | params / device GiB | KV cache / device GiB | total / device GiB |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {name} | {mesh} | {batch} | {r['kept_tokens']} | {r['param_bytes_per_device'] / gib:.2f} "
            f"| {r['kv_cache_bytes_per_device'] / gib:.2f} | {r['bytes_per_device'] / gib:.2f} |"
        )
    return "\n".join(lines), rows


# ----------------------------------------------------------------------------- CLI


def _table(
    cfg, text_tokens: int, new_tokens: int, keeps, kv_dtype_bytes: int, image_hw=None
) -> tuple[str, list[dict]]:
    if image_hw is None:
        rows = [estimate(cfg, text_tokens, keep=k, new_tokens=new_tokens, kv_dtype_bytes=kv_dtype_bytes) for k in keeps]
    else:
        rows = [
            estimate_qwen2_5_vl(cfg, text_tokens, image_hw, keep=k, new_tokens=new_tokens, kv_dtype_bytes=kv_dtype_bytes)
            for k in keeps
        ]
    g, t = 1e9, 1e12
    head = (
        "| keep | seq len | vision GFLOPs | projector GFLOPs | pruning GFLOPs | LLM prefill TFLOPs "
        "| prefill total TFLOPs | LLM prefill reduction | total prefill reduction | decode GFLOPs/token "
        f"| KV cache ({kv_dtype_bytes * 8}-bit) MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['kept_tokens']} | {r['sequence_length']} | {r['vision_flops'] / g:.1f} | {r['projector_flops'] / g:.2f} "
            f"| {r['pruning_flops'] / g:.3f} | {r['llm_prefill_flops'] / t:.3f} | {r['prefill_flops_total'] / t:.3f} "
            f"| {r['prefill_reduction']:.2f}x | {r['prefill_flops_total_unpruned'] / r['prefill_flops_total']:.2f}x "
            f"| {r['decode_flops_per_token'] / g:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zspa_jax.estimate", description="LLaVA-1.5-7B FLOPs/KV table")
    parser.add_argument("--text-tokens", type=int, default=60, help="text tokens in the prompt (default 60)")
    parser.add_argument("--new-tokens", type=int, default=0, help="generated tokens (KV size, decode cost)")
    parser.add_argument("--keep", type=int, nargs="+", default=None, help="kept visual tokens (default: all, 192/256, 128, 64)")
    parser.add_argument("--model", choices=tuple(MODELS), default="llava-1.5-7b")
    parser.add_argument("--image", default="448x448", help="Qwen2.5-VL image size HxW in pixels (default 448x448)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--mesh", default=None, help="data=D,model=M: per-device parameter and KV-cache bytes")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (with --mesh; default 1)")
    args = parser.parse_args(argv)
    if args.mesh is not None:
        return _mesh_main(args, parser)
    if args.model not in ("llava-1.5-7b", "qwen2.5-vl-7b"):
        parser.error(f"the FLOPs table covers llava-1.5-7b and qwen2.5-vl-7b; {args.model} goes with --mesh")
    if args.model == "qwen2.5-vl-7b":
        cfg = qwen2_5_vl_7b_config()
        hw = tuple(int(x) for x in args.image.lower().split("x"))
        n = estimate_qwen2_5_vl(cfg, args.text_tokens, hw)["visual_tokens"]
        keeps = args.keep or list(dict.fromkeys(k for k in (n, 256, 128, 64) if k <= n))
        table, rows = _table(cfg, args.text_tokens, args.new_tokens, keeps, kv_dtype_bytes=2, image_hw=hw)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        w = rows[0]
        print(
            f"Qwen2.5-VL-7B, B=1, a {hw[0]}x{hw[1]} image -> grid {w['grid_hw'][0]}x{w['grid_hw'][1]} patches, "
            f"{n} visual tokens, {args.text_tokens} text tokens, {args.new_tokens} new tokens (vision GFLOPs include "
            f"the merger); weights (bf16): vision "
            f"{w['weight_bytes_vision'] / 2**30:.2f} GiB, LLM {w['weight_bytes_llm'] / 2**30:.2f} GiB"
        )
        print(table)
        return 0
    args.keep = args.keep or [576, 192, 128, 64]
    cfg = LLAVA_1_5_7B
    table, rows = _table(cfg, args.text_tokens, args.new_tokens, args.keep, kv_dtype_bytes=2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    w = rows[0]
    print(
        f"LLaVA-1.5-7B (CLIP ViT-L/14-336 -> 2-layer MLP -> LLaMA-2-7B), B=1, {args.text_tokens} text tokens + "
        f"{cfg.image_seq_length} visual tokens, {args.new_tokens} new tokens; FLOPs = 2 x MACs of matrix products, "
        "attention over the full n x n square (not causal-halved)."
    )
    print(
        f"weights (f16): vision {w['weight_bytes_vision'] / 2**30:.2f} GiB, projector "
        f"{w['weight_bytes_projector'] / 2**20:.0f} MiB, LLM {w['weight_bytes_llm'] / 2**30:.2f} GiB; "
        f"decode reads {w['decode_weight_bytes_per_token'] / 2**30:.2f} GiB of weights per token; "
        f"KV {w['kv_cache_bytes_per_token'] / 2**10:.0f} KiB per token (f16)"
    )
    print(table)
    return 0


MODELS = {
    "llava-1.5-7b": llava_1_5_7b_config,
    "llava-1.5-13b": llava_1_5_13b_config,
    "qwen2.5-vl-7b": qwen2_5_vl_7b_config,
    "qwen2.5-vl-72b": qwen2_5_vl_72b_config,
}


def _mesh_main(args, parser) -> int:
    from zspa_jax.sharding import parse_mesh_shape

    try:
        sizes = parse_mesh_shape(args.mesh)
    except ValueError as e:
        parser.error(f"--mesh: {e}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    cfg = MODELS[args.model]()
    if isinstance(cfg, Qwen2_5_VLConfig):
        hw = tuple(int(x) for x in args.image.lower().split("x"))
        gh, gw = qwen_image_grid(*hw, cfg.vision)
        n = gh * gw // cfg.vision.merge_unit
    else:
        n = cfg.image_seq_length
    keeps = args.keep or list(dict.fromkeys(k for k in (n, 256, 128, 64) if k <= n))
    table, rows = _mesh_table(args.model, cfg, sizes, args.batch, args.text_tokens, args.new_tokens, n, keeps)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    r = rows[0]
    print(
        f"{args.model} on data={sizes['data']} x model={sizes['model']} devices: {r['param_bytes_total'] / 2**30:.1f} GiB "
        f"of parameters ({cfg.text.dtype}); B={args.batch}, {n} visual + {args.text_tokens} text + "
        f"{args.new_tokens} new tokens per row; KV heads "
        + ("split over model" if r["kv_heads_split"] else f"({cfg.text.num_key_value_heads}) do not divide model: replicated")
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
