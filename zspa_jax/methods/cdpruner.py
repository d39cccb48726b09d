"""CDPruner: conditional-DPP visual-token selection.

Paper: Q. Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", NeurIPS 2025, arXiv:2506.10967 (section 3).
Official code: github.com/Theia-4869/CDPruner, `llava/model/llava_arch.py`
(`LlavaMetaForCausalLM.encode_images`).

Per example, with projected visual tokens v_1..v_N and the prompt vector p:
  1. similarity S_ij = <v^_i, v^_j> (unit vectors, norms floored at 1e-6);
  2. relevance s_j = <p^, v^_j> to the *same prompt vector ZSPAPrune uses* (mean of the
     prompt's input-embedding rows). The official code scores CLIP-space tokens against
     CLIP text embeddings and negates them (a sign it observed only for CLIP); here both
     live in the LLM embedding space, so the relevance is used as is;
  3. min-max normalisation as in the official code: w_j = (s_j - min s + 1e-6) / (max s -
     min s). A constant s (e.g. no real prompt token) carries no relevance information
     and gives w = 1 (the limit of the formula: every weight equal), i.e. a plain DPP;
  4. optional theta (paper, relevance/diversity trade-off of Chen et al. 2018):
     w <- exp(alpha w), alpha = theta / (2 (1 - theta)). The official code ships with
     it commented out, so the default `theta=None` uses w directly;
  5. kernel L = diag(w) S diag(w) (S_jj taken as exactly |v^_j|^2, i.e. 1 for any token
     with norm >= 1e-6, not its rounded dot product); greedy MAP inference of the DPP with incremental
     Cholesky updates (Chen et al., "Fast Greedy MAP Inference for DPP", NeurIPS 2018):
     d_j = L_jj; K times pick j* = argmax d_j over unselected j (ties -> lower index),
     e = (L[j*, :] - sum_t c_t[j*] c_t) / sqrt(d_j*), store e as c_i, d <- d - e^2.
     Once every remaining gain is <= 0 (only when K exceeds the kernel's rank, <= D) the
     update is skipped (e = 0) instead of producing NaN as the official code would, so
     the remaining picks follow the largest remaining gain, lower index first.
Returns the K indices sorted ascending. The kernel rows are computed on the fly, so no
N x N matrix is stored; the loop is a `lax.fori_loop` over K with c [K, N] and d [N].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from zspa_jax.methods._common import EPS, HIGHEST, batched, prompt_relevance, unit
from zspa_jax.methods.base import Method, Selection

__all__ = ["METHOD", "cdpruner_select", "normalized_relevance"]


def normalized_relevance(
    s: jax.Array, theta: float | None = None, valid: jax.Array | None = None
) -> jax.Array:
    """Relevance weights w [N] from cosine scores s [N] (steps 3-4 of the module docstring);
    with `valid` [N] the min-max range is that of the real tokens."""
    if valid is None:
        lo, hi = jnp.min(s), jnp.max(s)
    else:
        lo, hi = jnp.min(jnp.where(valid, s, jnp.inf)), jnp.max(jnp.where(valid, s, -jnp.inf))
    w = jnp.where(hi > lo, (s - lo + 1e-6) / jnp.where(hi > lo, hi - lo, 1.0), 1.0)
    if theta is not None:
        w = jnp.exp(theta / (2.0 * (1.0 - theta)) * w)
    return w


def _cdpruner_one(
    v: jax.Array,
    t: jax.Array,
    m: jax.Array,
    valid: jax.Array | None = None,
    *,
    keep: int,
    theta: float | None,
) -> jax.Array:
    """One example: v [N, D], t [T, D] f32, m bool [T], valid bool [N] | None -> sorted int32 [keep].
    Masked tokens get unit vector 0 and gain -inf: never picked, and their kernel rows are 0."""
    n = v.shape[0]
    vn = unit(v)
    if valid is not None:
        vn = jnp.where(valid[:, None], vn, 0.0)
    w = normalized_relevance(prompt_relevance(vn, t, m), theta, valid)
    # diag(L) = w^2 S_jj with S_jj = |v^_j|^2: exactly 1 unless |v_j| < 1e-6 (floored norm),
    # so equal weights tie exactly instead of by the rounding of a dot product.
    norm = jnp.sqrt(jnp.sum(v * v, axis=-1))
    d = w * w * jnp.where(norm >= EPS, 1.0, jnp.square(norm / EPS))
    if valid is not None:
        d = jnp.where(valid, d, -jnp.inf)
    cis = jnp.zeros((keep, n), jnp.float32)
    picks = jnp.zeros((keep,), jnp.int32)

    def step(i, state):
        cis, d, picks = state
        j = jnp.argmax(d).astype(jnp.int32)  # first maximum: ties -> lower index
        dj = d[j]
        row = w[j] * w * jnp.einsum("nd,d->n", vn, vn[j], precision=HIGHEST)  # L[j, :]
        proj = jnp.einsum("k,kn->n", cis[:, j], cis, precision=HIGHEST)  # rows >= i are zero
        e = jnp.where(dj > 0, (row - proj) / jnp.sqrt(jnp.where(dj > 0, dj, 1.0)), 0.0)
        d = (d - e * e).at[j].set(-jnp.inf)
        return cis.at[i].set(e), d, picks.at[i].set(j)

    _, _, picks = lax.fori_loop(0, keep, step, (cis, d, picks))
    return jnp.sort(picks)


@partial(jax.jit, static_argnames=("keep", "theta", "batching"))
def cdpruner_select(
    visual: jax.Array,
    prompt: jax.Array,
    prompt_mask: jax.Array | None,
    valid: jax.Array | None = None,
    *,
    keep: int,
    theta: float | None = None,
    batching: str = "vmap",
) -> jax.Array:
    """CDPruner indices: visual [B, N, D], prompt [B, T, D], prompt_mask [B, T] | None, valid
    [B, N] | None -> int32 [B, keep].

    Ascending per row; deterministic (ties -> lower index); float32 inside. `theta` in
    (0, 1) enables the paper's exp(alpha * w) relevance weighting (None: official default).
    Shapes and `keep` are validated by `zspa_jax.select_tokens`.
    """
    v = visual.astype(jnp.float32)
    t = prompt.astype(jnp.float32)
    m = jnp.ones(t.shape[:2], jnp.bool_) if prompt_mask is None else prompt_mask != 0
    one = partial(_cdpruner_one, keep=keep, theta=theta)
    if valid is None:
        return batched(one, (v, t, m), batching)
    v = jnp.where(valid[..., None], v, 0.0)  # padding may hold NaN: keep it out of every sum
    return batched(one, (v, t, m, valid), batching)


def cdpruner_flops(n: int, d: int, keep: int, text_tokens: int, **_) -> int:
    """Unit vectors, prompt relevance, then per pick one kernel row L[j, :] (N*D MACs) and
    the Cholesky projection over the whole [K, N] buffer (K*N MACs); 0 when keep == n."""
    if keep >= n:
        return 0
    return 3 * n * d + 2 * text_tokens * d + 2 * n * d + 2 * keep * n * (d + keep)


METHOD = Method(
    name="cdpruner",
    stage="embedding",
    select=lambda inputs, *, keep, batching: Selection(
        cdpruner_select(
            inputs.visual,
            inputs.prompt,
            inputs.prompt_mask,
            inputs.valid,
            keep=keep,
            batching=batching,
        )
    ),
    flops=cdpruner_flops,
    summary="greedy MAP of a conditional DPP: cosine similarity weighted by prompt relevance",
    citation="arXiv:2506.10967, github.com/Theia-4869/CDPruner",
    needs_prompt=True,
)
