"""Generic FLOP counts: the decoder (LLM prefill, decode) and the pruning methods' selection.

Nothing here knows a model family: the vision towers and projectors are counted by each
family's estimate hooks (zspa_jax.families.<family>.estimate), bytes by
zspa_jax.estimate.memory.

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
  (zspa_jax.families.llava.estimate)
* Projector: N * (d_vision*n_layers * d + d * d) MACs (linear_1, linear_2).
  (zspa_jax.families.llava.estimate)
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
                         is in the LLM: layers < K (its `layer` option) run on all T + N tokens,
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
  (zspa_jax.estimate.memory)

Everything scales with `batch` except weight bytes.

Qwen2.5-VL's tower and merger (the image grid, windowed attention): the docstring of
zspa_jax.families.qwen2_5_vl.estimate. Its LLM is the shared decoder count with L' = T + K.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.llama import LlamaConfig
from zspa_jax.methods import get_method
from zspa_jax.methods.zspaprune import DEFAULT_CORE_RATIO

__all__ = [
    "decode_flops",
    "decoder_layer_macs",
    "fastv_prefill_flops",
    "language_model_flops",
    "llm_prefill_flops",
    "method_flops",
    "pruning_flops",
]


def decoder_layer_macs(t: LlamaConfig, n: int, kv_len: int | None = None) -> int:
    """MACs of one LLaMA layer for n query tokens attending to kv_len keys (default n)."""
    kv_len = n if kv_len is None else kv_len
    h, hkv, dh, d, m = (
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.hidden_size,
        t.intermediate_size,
    )
    projections = n * d * (h * dh + 2 * hkv * dh) + n * h * dh * d
    attention = 2 * n * kv_len * h * dh
    mlp = 3 * n * d * m
    return projections + attention + mlp


def pruning_flops(
    n: int, d: int, keep: int, text_tokens: int, core_ratio: float | str = DEFAULT_CORE_RATIO
) -> int:
    """FLOPs of `select_tokens(method="zspaprune")` for one example (0 when keep == n)."""
    return method_flops("zspaprune", n, d, keep, text_tokens, {"core_ratio": core_ratio})


def method_flops(
    method: str,
    n: int,
    d: int,
    keep: int,
    text_tokens: int,
    options: Mapping[str, Any] | None = None,
    *,
    key_dim: int | None = None,
    auto_zero_share: float = 1.0,
) -> int:
    """FLOPs of one example's token selection by `method` (its record's `flops`; the module
    docstring lists each formula).

    n: visual tokens N; d: the width the method reads (the LLM width D for the
    embedding-stage methods, the tower width C for the tower-stage ones); options: the
    method's options (`PruneConfig.options`, or some of them by name; the others take their
    defaults), e.g. {"core_ratio": "auto"}; key_dim: the tower's head width Dh
    ("visionzip"; default d); auto_zero_share: expected share of examples whose automatic
    core is empty (1 = the worst case, what a vmapped batch computes). Methods inside the
    LLM count their selection only; their saving is in the LLM prefill
    (`fastv_prefill_flops`).
    """
    record = get_method(method)
    values = record.resolve_options(options)
    return int(
        record.flops(
            n, d, keep, text_tokens, key_dim=key_dim, auto_zero_share=auto_zero_share, **values
        )
    )


def fastv_prefill_flops(
    t: LlamaConfig, text_tokens: int, n: int, keep: int, layer: int = 2, logits_positions: int = 1
) -> int:
    """FastV's LLM prefill (one sequence): layers < `layer` on T + N tokens, the rest on T + K."""
    early, late = text_tokens + n, text_tokens + keep
    layers = t.num_hidden_layers
    macs = layer * decoder_layer_macs(t, early) + (layers - layer) * decoder_layer_macs(t, late)
    return 2 * (macs + logits_positions * t.hidden_size * t.vocab_size)


def llm_prefill_flops(
    t: LlamaConfig, n: int, kv_len: int | None = None, logits_positions: int = 1
) -> int:
    """Decoder on n tokens + the LM head on `logits_positions` positions (one sequence)."""
    return 2 * (
        t.num_hidden_layers * decoder_layer_macs(t, n, kv_len)
        + logits_positions * t.hidden_size * t.vocab_size
    )


def decode_flops(t: LlamaConfig, context: int) -> int:
    """One decode step: one new token attending to `context` cached tokens (itself included)."""
    return 2 * (
        t.num_hidden_layers * decoder_layer_macs(t, 1, context) + t.hidden_size * t.vocab_size
    )


def language_model_flops(
    t,
    n: int,
    keep: int,
    text_tokens: int,
    new_tokens: int,
    batch: int,
    method: str = "zspaprune",
    options: Mapping[str, Any] | None = None,
    tower_dims: tuple[int, int] | None = None,
    tower_rows: tuple[int, int] | None = None,
):
    """(pruning, LLM prefill, unpruned LLM prefill, decode total, decode per token) FLOPs for
    a batch whose prompts hold `text_tokens` text tokens and keep `keep` of `n` visual tokens
    by `method` with `options` (its `layer` option, for a method inside the LLM, splits the
    decoder). tower_dims: (tower width, head width) read by the [CLS]-attention methods;
    tower_rows: (R, P) when such a method chooses keep / R of each of R tower rows of P tokens."""
    length = text_tokens + keep
    record = get_method(method)
    options = record.resolve_options(options)
    width, key_dim = tower_dims if record.stage == "tower" else (t.hidden_size, None)
    rows, chosen_from = tower_rows if record.stage == "tower" and tower_rows else (1, n)
    pruning = (
        batch
        * rows
        * method_flops(
            method, chosen_from, width, keep // rows, text_tokens, options, key_dim=key_dim
        )
    )
    fastv = record.llm_layer and keep < n  # early layers keep all N tokens
    layer = options["layer"] if fastv else 0
    if fastv:
        prefill = batch * fastv_prefill_flops(t, text_tokens, n, keep, layer)
    else:
        prefill = batch * llm_prefill_flops(t, length)
    prefill_full = batch * llm_prefill_flops(t, text_tokens + n)

    def step(i: int) -> int:  # decode step i: FastV's early layers still attend over all N
        if not fastv:
            return decode_flops(t, length + i + 1)
        early = layer * decoder_layer_macs(t, 1, text_tokens + n + i + 1)
        late = (t.num_hidden_layers - layer) * decoder_layer_macs(t, 1, length + i + 1)
        return 2 * (early + late + t.hidden_size * t.vocab_size)

    if not new_tokens:
        return pruning, prefill, prefill_full, 0, float(step(0))
    decode_total = batch * sum(step(i) for i in range(new_tokens))
    return pruning, prefill, prefill_full, decode_total, decode_total / (batch * new_tokens)
