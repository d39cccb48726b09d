"""VisPruner: important tokens by the vision tower's [CLS] attention, then diverse ones.

Paper: Q. Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", ICCV 2025, arXiv:2412.01818 (section 4).
Official code: github.com/Theia-4869/VisPruner, `llava/model/llava_arch.py`
(`encode_images`) and `llava/model/multimodal_encoder/clip_encoder.py`.

Per example, with tower features x_1..x_N (the hidden state at LLaVA's feature layer,
before the projector, as the official code) and a_j = the [CLS] query's attention to
token j at that layer, averaged over heads:
  1. T_imp = int(K * important_ratio) (default 0.5), T_div = K - T_imp;
  2. order the tokens by a_j descending (ties -> lower index); the first T_imp are the
     important tokens, the rest (in that order) the residual list;
  3. while the residual list holds more than T_div tokens: r = min(8, R - T_div); split
     the list by position into a = even positions, b = odd positions; score each a by its
     largest cosine similarity to any b; sort the a's by score descending (ties -> the
     earlier position) and drop the first r (the most duplicated), keeping the others in
     that sorted order; the new list is [kept a's] + [b's]. When r exceeds the number of
     a's, all a's are dropped (the official slice `argsort(...)[:, r:]`; its index
     broadcast fails there, e.g. at K = 1);
  4. return the important and the residual tokens, sorted ascending.
The number of rounds and each round's list length depend only on (N, K), so the loop is a
`lax.fori_loop` over a fixed-size buffer with a precomputed schedule; similarities come
from one N x N cosine matrix.
On LLaVA-NeXT (anyres) it runs on every crop, base view included, with the same K, as
the official LLaVA-NeXT path; the crops' kept tokens are laid out by the family's tower
layout (`models.llava_next.LlavaNextForConditionalGeneration.cls_tower`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zspa_jax.methods._common import HIGHEST, batched, unit
from zspa_jax.methods.base import Method, MethodInputs, Selection

__all__ = ["IMPORTANT_RATIO", "METHOD", "schedule", "vispruner_select"]

IMPORTANT_RATIO = 0.5  # official default (--important_ratio 0.5)
MAX_DROP = 8  # tokens dropped per round in the official code


def split_counts(keep: int, important_ratio: float = IMPORTANT_RATIO) -> tuple[int, int]:
    """(T_imp, T_div) = (int(K * ratio), K - T_imp), the official integer split."""
    t_imp = int(keep * important_ratio)
    return t_imp, keep - t_imp


def schedule(n: int, keep: int, important_ratio: float = IMPORTANT_RATIO) -> list[tuple[int, int]]:
    """[(R, r)] per round: list length before the round and the r of that round."""
    t_imp, t_div = split_counts(keep, important_ratio)
    rounds, length = [], n - t_imp
    if t_div == 0:
        return rounds
    while True:
        r = min(MAX_DROP, length - t_div)
        if r <= 0:
            return rounds
        rounds.append((length, r))
        length -= min(r, math.ceil(length / 2))


def _vispruner_one(x: jax.Array, a: jax.Array, *, keep: int, important_ratio: float) -> jax.Array:
    """One example: x [N, C] f32, a [N] f32 -> sorted int32 [keep]."""
    n = x.shape[0]
    t_imp, t_div = split_counts(keep, important_ratio)
    order = jnp.argsort(-a, stable=True).astype(jnp.int32)
    important, buf = order[:t_imp], order[t_imp:]
    rounds = schedule(n, keep, important_ratio)
    if rounds:
        xn = unit(x)
        sim = jnp.einsum("nc,mc->nm", xn, xn, precision=HIGHEST)
        r0 = buf.shape[0]
        n_even, n_odd = (r0 + 1) // 2, r0 // 2
        table = jnp.asarray(np.array(rounds, np.int32))  # [rounds, 2]
        pos_even, pos_odd = jnp.arange(n_even), jnp.arange(n_odd)
        q = jnp.arange(r0)

        def step(i, buf):
            length, r = table[i, 0], table[i, 1]
            n_a, n_b = (length + 1) // 2, length // 2
            ev, od = buf[0::2], buf[1::2]
            s = sim[ev[:, None], od[None, :]]
            score = jnp.max(jnp.where(pos_odd[None, :] < n_b, s, -jnp.inf), axis=1)
            key = jnp.where(pos_even < n_a, -score, jnp.inf)
            ord_a = jnp.argsort(key, stable=True)  # most duplicated first, ties -> earlier position
            drop = jnp.minimum(r, n_a)
            kept_a = n_a - drop
            from_a = ev[ord_a[jnp.clip(drop + q, 0, n_even - 1)]]
            from_b = od[jnp.clip(q - kept_a, 0, n_odd - 1)]
            return jnp.where(q < kept_a, from_a, jnp.where(q < kept_a + n_b, from_b, 0)).astype(
                jnp.int32
            )

        buf = lax.fori_loop(0, len(rounds), step, buf)
    return jnp.sort(jnp.concatenate([important, buf[:t_div]]))


@partial(jax.jit, static_argnames=("keep", "important_ratio", "batching"))
def vispruner_select(
    features: jax.Array,
    cls_attention: jax.Array,
    *,
    keep: int,
    important_ratio: float = IMPORTANT_RATIO,
    batching: str = "vmap",
) -> jax.Array:
    """VisPruner indices: features [B, N, C], cls_attention [B, N] -> int32 [B, keep], ascending."""
    x = features.astype(jnp.float32)
    a = cls_attention.astype(jnp.float32)
    return batched(
        partial(_vispruner_one, keep=keep, important_ratio=important_ratio), (x, a), batching
    )


def _select(inputs: MethodInputs, *, keep: int, batching: str) -> Selection:
    return Selection(
        vispruner_select(inputs.visual, inputs.cls_attention, keep=keep, batching=batching)
    )


def vispruner_flops(n: int, d: int, keep: int, text_tokens: int, **_) -> int:
    """d = the tower width C: unit vectors and one N x N cosine matrix (the rounds only
    gather from it and sort); 0 when keep == n."""
    return 0 if keep >= n else 3 * n * d + 2 * n * n * d


METHOD = Method(
    name="vispruner",
    stage="tower",
    select=_select,
    flops=vispruner_flops,
    summary="half the budget by the tower's [CLS] attention, the rest by duplicate-removal rounds on tower features",
    citation="arXiv:2412.01818, github.com/Theia-4869/VisPruner",
    accepts_mask=False,
)
