"""DART: keep the visual tokens that duplicate a few pivot tokens least, inside the LLM.

Paper: Z. Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", EMNLP 2025, arXiv:2502.11494 (section 3).
Official code: github.com/ZichenWen1/DART (read at commit 5a19452, Aug 31 2025),
`llava/model/language_model/modeling_llama_self.py`, `DART.forward` and
`DART.get_retained_image_token` (LLaVA-1.5/1.6), and its Qwen2.5-VL port
`Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py` (`DART.get_retained_image_token`,
the same selection; Qwen2-VL's `Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py` too).

Options (the record's): `layer` K (official `--pruned_layer 2`), `image_pivots` and
`text_pivots` (official `--pivot_image_token 4 --pivot_text_token 4`; every LLaVA-1.5/1.6
and Qwen eval script of the official code passes these values).

What the official code does, at decoder layer K (default K = 2), before running it, on the
whole prompt (batch size 1):
  * `last_layer_state = self.norm(layer_outputs[0])`: the output of layer K-1 (= the hidden
    states entering layer K) passed through the model's *final* RMSNorm;
  * `any_states = layer_outputs[-2]`: the **key states of layer K-1** as its attention used
    them: after RoPE (M-RoPE for Qwen), heads concatenated to [L, H * Dh] (the LLaVA eager /
    SDPA paths repeat the KV heads first; that scales every L1 norm by the same factor and
    changes no ranking);
  * pivots: the `pivot_image_token` (default 4) image tokens with the largest L1 norm of
    their key, and the `pivot_text_token` (default 4) tokens *after the image span* (the
    question and the chat template's tail) with the largest key L1 norm;
  * candidates: the image tokens that are not image pivots. For each pivot in turn (Python
    set iteration order), the `TOKEN_TOPK` candidates with the largest
    `-cosine_similarity(last_layer_state[pivot], last_layer_state[candidate])` (the least
    similar ones, i.e. the least duplicated) are kept and removed from the candidates;
  * kept = image pivots + every pivot's picks; text pivots are only used as queries.
    `TOKEN_TOPK = max_num_trunction // (pivots)` in LLaVA-1.5 (scripts: `max_num_trunction
    128`, reduction 0.778, i.e. 16 per pivot, 4 + 8 * 16 = 132 kept of 576), and
    `int(N * (1 - reduction_ratio) / pivots)` in Qwen2.5-VL: the count is pivots + per-pivot
    top-k, never exactly a requested K.

What `dart_select` implements (per row; rows are independent):
  1. s = the row's N visual slots (one contiguous span, or each image's in order). Image pivots: the
     p_i = min(num_image_pivots, keep, real visual tokens) real visual tokens with the largest
     key L1 norm sum_c |keys[s_j, c]| (ties -> lower index). Text pivots: the
     p_t = min(num_text_pivots, sum(text_mask)) positions of `text_mask` with the largest key
     L1 norm (ties -> lower position).
  2. Cosine vectors: `hidden` [L, D] times `norm_weight` (when given). The official final
     RMSNorm w * x / rms(x) differs from w * x by a positive per-token factor, which no
     cosine sees, so passing the raw layer-(K-1) output with the final norm's weight (or the
     normed states with norm_weight=None) is exactly the official score. Unit vectors use
     the shared 1e-6 norm floor (torch's cosine_similarity floors at 1e-8; only tokens of
     norm < 1e-6 can differ).
  3. Pivot order: image pivots by ascending index, then text pivots by ascending position,
     i.e. ascending sequence position in the official layout (text after the image). The
     official order is CPython's iteration order of `indices_set` (an 8-int set has 32 hash
     slots, so it is ascending only for positions < 32 and otherwise by position mod 32):
     an implementation detail, replaced by this fixed order.
  4. Budget: R = keep - p_i duplicates-aware picks shared by the P = p_i + p_t pivots: pivot
     number r (0-based, in the order of 3) takes q_r = R // P + (1 if r < R % P else 0).
     Pivot r picks, among the real visual tokens not yet kept, the q_r with the smallest
     cosine to it (= the official top-k of -cos), ties -> lower index; they leave the
     candidates. Result: the p_i image pivots + R picks = exactly `keep` tokens, returned as
     ascending indices into the span.

Deviations from the official code, and why:
  * exactly `keep` tokens (the pipeline's static shapes need it): the official count
    p_i + P * TOKEN_TOPK becomes p_i + R with the R picks spread over the pivots as evenly as
    possible, the remainder going to the first pivots of step 3's order. With keep = p_i +
    P * t every pivot takes TOKEN_TOPK = t, the official rule (tests/test_dart.py checks this
    against a near-literal copy of the official loop);
  * a fixed pivot order (step 3) and explicit ties -> lower index everywhere (torch.topk
    leaves ties unspecified, and the Qwen ports list candidates in set order);
  * fewer pivots when a row lacks them: p_i <= keep and real tokens, p_t <= real text tokens
    (torch.topk would raise). A row with num_image_pivots = 0 and no text token uses one
    image pivot (otherwise nothing could choose its tokens);
  * batched, left padding and padding slots inside the span (`visual_valid`): padding is
    never a pivot or a pick and never enters a norm or a cosine (masked with `where`, so it
    may hold anything, NaN included). The official code is batch-size-1 only;
  * float32 throughout, dot products at Precision.HIGHEST.
Precondition (checked by the callers, not here): the visual slots lie in [0, L) and every row has at
least `keep` real visual tokens; if a row has fewer, its surplus slots are the
lowest-index unpicked ones (padding included).

Cost: one [N, D] x [D, P] cosine product (no N x N matrix) and one stable argsort of N
scores per pivot inside a `lax.fori_loop` over the (at most num_image_pivots +
num_text_pivots) pivots.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from zspa_jax.methods._common import HIGHEST, batched, default_batching, unit
from zspa_jax.methods.base import LayerInputs, Method, Option, layer_option

__all__ = [
    "DEFAULT_IMAGE_PIVOTS",
    "DEFAULT_LAYER",
    "DEFAULT_TEXT_PIVOTS",
    "METHOD",
    "dart_flops",
    "dart_select",
]

DEFAULT_LAYER = 2  # official `--pruned_layer 2` (LLaVA-1.5/1.6, Qwen2-VL, Qwen2.5-VL scripts)
DEFAULT_IMAGE_PIVOTS = 4  # official `--pivot_image_token 4`
DEFAULT_TEXT_PIVOTS = 4  # official `--pivot_text_token 4`


def _dart_one(
    h: jax.Array,
    k: jax.Array,
    index: jax.Array,
    tm: jax.Array,
    valid: jax.Array,
    w: jax.Array | None,
    *,
    num_visual: int,
    keep: int,
    num_image_pivots: int,
    num_text_pivots: int,
) -> jax.Array:
    """One row: h [L, D], k [L, Dk] f32, index int32 [N] (the visual tokens' positions,
    ascending), tm bool [L], valid bool [N], w [D] | None -> ascending int32 [keep] indices
    into the N visual tokens."""
    n, length = num_visual, h.shape[0]
    if w is not None:
        h = h * w
    vis_h = jnp.take(h, index, axis=0)  # [N, D]
    vis_k = jnp.take(k, index, axis=0)  # [N, Dk]

    # Step 1: pivots by key L1 norm (|x| sums are >= +0.0: no signed zero reaches top_k).
    img_l1 = jnp.where(valid, jnp.sum(jnp.abs(vis_k), axis=-1), -jnp.inf)
    txt_l1 = jnp.where(tm, jnp.sum(jnp.abs(k), axis=-1), -jnp.inf)
    n_valid = jnp.sum(valid.astype(jnp.int32))
    p_t = jnp.minimum(num_text_pivots, jnp.sum(tm.astype(jnp.int32)))
    wanted = num_image_pivots if num_image_pivots > 0 else jnp.where(p_t == 0, 1, 0)
    p_i = jnp.minimum(jnp.minimum(wanted, keep), n_valid)
    cap_i = min(max(num_image_pivots, 1), n)  # static bounds on p_i, p_t
    cap_t = min(num_text_pivots, length)

    # Active pivots first, each kind by ascending index (inactive ones sort last).
    slot_i = jnp.arange(cap_i)
    img_piv = jnp.sort(jnp.where(slot_i < p_i, lax.top_k(img_l1, cap_i)[1], n))  # [cap_i]
    if cap_t > 0:
        slot_t = jnp.arange(cap_t)
        txt_piv = jnp.sort(jnp.where(slot_t < p_t, lax.top_k(txt_l1, cap_t)[1], length))
        positions = jnp.concatenate(
            [jnp.take(index, img_piv, mode="clip"), txt_piv]
        )  # sequence positions
        active = jnp.concatenate([slot_i < p_i, slot_t < p_t])
        rank = jnp.concatenate([slot_i, p_i + slot_t])  # order among the active pivots
    else:
        positions, active, rank = jnp.take(index, img_piv, mode="clip"), slot_i < p_i, slot_i

    # Step 4's quotas: R picks spread over the P pivots, the remainder to the first ones.
    total = p_i + p_t
    spare = keep - p_i
    per = spare // jnp.maximum(total, 1)
    quota = jnp.where(active, per + (rank < spare - per * total).astype(jnp.int32), 0)

    # Step 2: cosines of every span token to every pivot, [N, P] (pivot rows of padding are
    # never read: inactive pivots point at a clamped position and have quota 0).
    piv_h = jnp.take(h, jnp.clip(positions, 0, length - 1), axis=0)
    cos = jnp.einsum("nd,pd->np", unit(vis_h), unit(piv_h), precision=HIGHEST)
    cos = jnp.where(cos == 0.0, 0.0, cos)  # -0.0 ties with +0.0

    kept = jnp.zeros((n,), jnp.bool_).at[img_piv].set(True, mode="drop")
    free = valid & ~kept
    order_slots = jnp.arange(n)

    def pick(j, state):
        kept, free = state
        score = jnp.where(free, cos[:, j], jnp.inf)  # smallest cosine = least duplicated
        order = jnp.argsort(score, stable=True)  # ties -> lower index
        take = jnp.zeros((n,), jnp.bool_).at[order].set(order_slots < quota[j])
        return kept | take, free & ~take

    kept, _ = lax.fori_loop(0, positions.shape[0], pick, (kept, free))
    # Exactly `keep` picks when the precondition holds; top_k then lists them (lower index
    # first among equal flags, so any surplus slot is the lowest unpicked one).
    return jnp.sort(lax.top_k(kept.astype(jnp.float32), keep)[1]).astype(jnp.int32)


@partial(
    jax.jit,
    static_argnames=(
        "num_visual",
        "keep",
        "num_image_pivots",
        "num_text_pivots",
        "batching",
    ),
)
def dart_select(
    hidden: jax.Array,
    keys: jax.Array,
    visual_start: jax.Array,
    text_mask: jax.Array,
    *,
    num_visual: int,
    keep: int,
    visual_valid: jax.Array | None = None,
    norm_weight: jax.Array | None = None,
    num_image_pivots: int = DEFAULT_IMAGE_PIVOTS,
    num_text_pivots: int = DEFAULT_TEXT_PIVOTS,
    batching: str = "vmap",
) -> jax.Array:
    """DART indices (module docstring) -> int32 [B, keep], ascending indices into the span.

    hidden: [B, L, D] the hidden states entering decoder layer K (output of layer K-1),
      whole left-padded sequence; the cosines read them (times `norm_weight`).
    keys: [B, L, H, Dh] or [B, L, H * Dh] layer K-1's attention keys after RoPE (KV heads,
      un-repeated or repeated alike); the pivots are the largest L1 norms of these.
    visual_start: int32 [B] first slot of each row's contiguous span of `num_visual` visual
      slots, or int32 [B, N] the position of each visual slot (ascending; several images).
    text_mask: bool [B, L] the real text tokens that may be text pivots (official: every token
      after the span).
    visual_valid: bool [B, N] | None real slots of the span (padding: never chosen, never read).
    norm_weight: [D] | None the final RMSNorm's weight (official cosines use the normed states;
      None: `hidden` is used as given, e.g. already normed).
    num_image_pivots / num_text_pivots: official defaults 4 / 4. `keep` (static) in [1, N].
    """
    b, length = hidden.shape[:2]
    h = hidden.astype(jnp.float32)
    k = keys.reshape(b, length, -1).astype(jnp.float32)
    start = jnp.asarray(visual_start, jnp.int32)
    index = (
        start.reshape(b, -1)
        if start.ndim == 2
        else start.reshape(b, 1) + jnp.arange(num_visual)[None, :]
    )
    tm = jnp.asarray(text_mask) != 0
    valid = (
        jnp.ones((b, num_visual), jnp.bool_)
        if visual_valid is None
        else jnp.asarray(visual_valid) != 0
    )
    w = None if norm_weight is None else jnp.asarray(norm_weight, jnp.float32)
    one = partial(
        _dart_one,
        w=w,
        num_visual=num_visual,
        keep=keep,
        num_image_pivots=num_image_pivots,
        num_text_pivots=num_text_pivots,
    )
    return batched(one, (h, k, index, tm, valid), batching)


def dart_flops(
    n: int,
    d: int,
    keep: int,
    text_tokens: int,
    *,
    key_dim: int | None = None,
    num_image_pivots: int = DEFAULT_IMAGE_PIVOTS,
    num_text_pivots: int = DEFAULT_TEXT_PIVOTS,
    **_,
) -> int:
    """Selection FLOPs, 2 per multiply-add, 1 per add:

      (n + text_tokens) * key_dim      key L1 norms (abs is free, one add per entry)
    + 2 * (n + P) * d                  unit vectors of the n span tokens and the P pivots
    + 2 * n * d * P                    cosines of the span to the P pivots
    with P = min(num_image_pivots, keep, n) + min(num_text_pivots, text_tokens) and
    key_dim = d when not given (the keys' width H * Dh). Sorts and top-ks are not counted.
    """
    kd = d if key_dim is None else key_dim
    pivots = min(num_image_pivots, keep, n) + min(num_text_pivots, text_tokens)
    return (n + text_tokens) * kd + 2 * (n + pivots) * d + 2 * n * d * pivots


def _select(inputs: LayerInputs, *, keep: int, image_pivots: int, text_pivots: int) -> jax.Array:
    b, length = inputs.hidden.shape[:2]
    return dart_select(
        inputs.hidden,
        inputs.keys.reshape(b, length, -1),
        inputs.visual_index,
        inputs.text_mask,
        num_visual=inputs.num_visual,
        keep=keep,
        visual_valid=inputs.visual_valid,
        norm_weight=inputs.norm_weight,
        num_image_pivots=image_pivots,
        num_text_pivots=text_pivots,
        batching=default_batching(),
    )


def _flops(n, d, keep, text_tokens, *, image_pivots, text_pivots, key_dim=None, **_) -> int:
    if keep >= n:
        return 0
    return dart_flops(
        n,
        d,
        keep,
        text_tokens,
        key_dim=key_dim,
        num_image_pivots=image_pivots,
        num_text_pivots=text_pivots,
    )


_OFFICIAL_SCRIPTS = "official scripts (github.com/ZichenWen1/DART, scripts/v1_5/eval/*.sh)"
OPTIONS = (
    layer_option(f"{DEFAULT_LAYER}: --pruned_layer {DEFAULT_LAYER} in the {_OFFICIAL_SCRIPTS}"),
    Option(
        name="image_pivots",
        type=int,
        default=DEFAULT_IMAGE_PIVOTS,
        minimum=0,
        help="image pivots: the visual tokens of largest key L1 norm, kept, that the others "
        "are compared with (0: none, unless the row has no text)",
        official=f"{DEFAULT_IMAGE_PIVOTS}: --pivot_image_token {DEFAULT_IMAGE_PIVOTS} in the {_OFFICIAL_SCRIPTS}",
    ),
    Option(
        name="text_pivots",
        type=int,
        default=DEFAULT_TEXT_PIVOTS,
        minimum=0,
        help="question pivots: the text tokens after the image of largest key L1 norm, "
        "compared with (not kept)",
        official=f"{DEFAULT_TEXT_PIVOTS}: --pivot_text_token {DEFAULT_TEXT_PIVOTS} in the {_OFFICIAL_SCRIPTS}",
    ),
)


METHOD = Method(
    name="dart",
    stage="llm",
    select=_select,
    flops=_flops,
    summary="pivot tokens (largest key L1 norm, image and question) at LLM layer K, then per pivot the visual "
    "tokens least similar to it; later layers never hold the others",
    citation="arXiv:2502.11494 (EMNLP 2025), github.com/ZichenWen1/DART",
    keeps_positions=True,
    options=OPTIONS,
)
