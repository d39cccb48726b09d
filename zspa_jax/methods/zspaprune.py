"""ZSPAPrune (arXiv 2510.17197) and its two ends, relevance-only (r = 1) and DivPrune (r = 0).

The six steps are README.md's "ZSPAPrune, exactly": a prompt-relevance core of
k = round(K r) tokens (top-k cosine to the mean prompt embedding), then a greedy max-min
diversity fill. The fill keeps a running c_j = max over kept i of cos(v_j, v_i): one
[N, D] matrix-vector product per pick, no N x N matrix except for DivPrune's first pick.
`core_ratio="auto"` picks k per example (`zspa_jax.methods.auto_core`).

DivPrune: S. Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025, arXiv:2503.02175; official code github.com/vbdi/divprune.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from zspa_jax.methods import auto_core
from zspa_jax.methods._common import HIGHEST, batched, prompt_relevance, unit
from zspa_jax.methods.base import Method, MethodInputs, Selection

AUTO = "auto"

__all__ = ["AUTO", "DIVPRUNE", "RELEVANCE", "ZSPAPRUNE", "core_size", "zspaprune_flops"]


def core_size(keep: int, core_ratio: float) -> int:
    """k = floor(K * r + 0.5) clipped to [0, K] (README "ZSPAPrune, exactly", step 4)."""
    return min(max(math.floor(keep * core_ratio + 0.5), 0), keep)


def _select_one(
    v: jax.Array, t: jax.Array, m: jax.Array, valid: jax.Array | None, *, keep: int, n_core: int
) -> jax.Array:
    """One example: v [N, D], t [T, D] f32, m [T] bool, valid [N] bool | None -> sorted int32 [keep].

    Masked tokens (valid False) get unit vector 0, relevance -inf and a running c of
    +inf, so they are never picked and never change another token's score.
    """
    n = v.shape[0]
    vn = unit(v)
    if valid is not None:
        vn = jnp.where(valid[:, None], vn, 0.0)
    picks = jnp.zeros((keep,), jnp.int32)
    selected = jnp.zeros((n,), jnp.bool_)
    if n_core > 0:
        # Steps 1-4: relevance to the mean prompt (masked rows contribute an exact 0).
        s = prompt_relevance(vn, t, m)
        if valid is not None:
            s = jnp.where(valid, s, -jnp.inf)
        core = lax.top_k(s, n_core)[1].astype(jnp.int32)  # ties -> lower index (documented)
        if n_core == keep:
            return jnp.sort(core)
        picks = picks.at[:n_core].set(core)
        selected = selected.at[core].set(True)
        c = jnp.max(jnp.einsum("nd,kd->nk", vn, vn[core], precision=HIGHEST), axis=1)
        start = n_core
    else:
        # r = 0: DivPrune's first pick, argmin_j max_{i != j} cos(v_j, v_i) (only N x N use).
        g = jnp.einsum("nd,md->nm", vn, vn, precision=HIGHEST)
        others = ~jnp.eye(n, dtype=jnp.bool_)
        if valid is not None:
            others &= valid[None, :]
        worst = jnp.max(jnp.where(others, g, -jnp.inf), axis=1)
        first = jnp.argmin(worst if valid is None else jnp.where(valid, worst, jnp.inf))
        first = first.astype(jnp.int32)
        picks = picks.at[0].set(first)
        selected = selected.at[first].set(True)
        c = g[:, first]
        start = 1

    # Step 5: greedy max-min fill with a running c_j = max_{i selected} cos(v_j, v_i).
    blocked = selected if valid is None else selected | ~valid

    def fill(i, state):
        c, blocked, picks = state
        j = jnp.argmin(jnp.where(blocked, jnp.inf, c)).astype(jnp.int32)  # first occurrence
        c = jnp.maximum(c, jnp.einsum("nd,d->n", vn, vn[j], precision=HIGHEST))
        return c, blocked.at[j].set(True), picks.at[i].set(j)

    _, _, picks = lax.fori_loop(start, keep, fill, (c, blocked, picks))
    return jnp.sort(picks)


@partial(jax.jit, static_argnames=("keep", "n_core", "batching"))
def select_fixed_core(
    visual: jax.Array,
    prompt: jax.Array | None,
    prompt_mask: jax.Array | None,
    valid: jax.Array | None = None,
    *,
    keep: int,
    n_core: int,
    batching: str,
) -> jax.Array:
    """Batched `_select_one`: [B, N, D], [B, T, D] | None, [B, T] | None, [B, N] | None -> int32 [B, keep].

    The static key is (keep, n_core): methods that reduce to the same k share one compile.
    """
    v = visual.astype(jnp.float32)
    if prompt is None:  # DivPrune reads no prompt (n_core = 0)
        prompt = jnp.zeros((v.shape[0], 1, v.shape[2]), jnp.float32)
    t = prompt.astype(jnp.float32)
    m = jnp.ones(t.shape[:2], jnp.bool_) if prompt_mask is None else prompt_mask != 0
    if valid is None:
        one = lambda v, t, m: _select_one(v, t, m, None, keep=keep, n_core=n_core)  # noqa: E731
        args = (v, t, m)
    else:
        v = jnp.where(valid[..., None], v, 0.0)  # padding may hold NaN: keep it out of every sum
        one = partial(_select_one, keep=keep, n_core=n_core)
        args = (v, t, m, valid)
    return batched(one, args, batching)


def _select(inputs: MethodInputs, *, keep: int, core_ratio, batching: str, fixed: float | None = None) -> Selection:
    r = core_ratio if fixed is None else fixed
    if r == AUTO:
        return Selection(auto_core.select_auto(inputs.visual, inputs.prompt, inputs.prompt_mask, inputs.valid,
                                               keep=keep, batching=batching))
    kept = select_fixed_core(
        inputs.visual, inputs.prompt, inputs.prompt_mask, inputs.valid, keep=keep, n_core=core_size(keep, float(r)),
        batching=batching,
    )
    return Selection(kept)


def zspaprune_flops(n: int, d: int, keep: int, text_tokens: int, *, core_ratio=0.6, auto_zero_share: float = 1.0,
                    **_) -> int:
    """FLOPs of one example (zspa_jax.estimate's convention; 0 when keep == n)."""
    if keep >= n:
        return 0
    if core_ratio == AUTO:
        gram = 2 * n * n * d  # DivPrune's first pick, only when the core is empty
        return round(3 * n * d + 2 * text_tokens * d + 2 * n * d + 2 * keep * n * d + auto_zero_share * gram)
    core = core_size(keep, float(core_ratio))
    flops = 3 * n * d  # unit vectors: squares, sums, divides
    if core > 0:
        flops += 2 * text_tokens * d  # prompt mean (masked sum + divide)
        flops += 2 * n * d  # relevance <p, v_j>
        if core == keep:
            return flops
        flops += 2 * n * core * d  # similarities to the core set
    else:
        flops += 2 * n * n * d  # DivPrune's first pick: the full N x N Gram matrix
        core = 1
    return flops + 2 * (keep - core) * n * d  # greedy fill: one N x D matvec per pick


ZSPAPRUNE = Method(
    name="zspaprune",
    stage="embedding",
    select=_select,
    flops=zspaprune_flops,
    summary="prompt-relevance core (core_ratio of the budget) + greedy max-min diversity fill",
    citation="arXiv:2510.17197",
    needs_prompt=True,
    uses_core_ratio=True,
)
RELEVANCE = Method(
    name="relevance",
    stage="embedding",
    select=partial(_select, fixed=1.0),
    flops=lambda n, d, keep, text_tokens, **_: zspaprune_flops(n, d, keep, text_tokens, core_ratio=1.0),
    summary="the K tokens most cosine-similar to the mean prompt embedding (ZSPAPrune with r = 1)",
    citation="arXiv:2510.17197",
    needs_prompt=True,
)
DIVPRUNE = Method(
    name="divprune",
    stage="embedding",
    select=partial(_select, fixed=0.0),
    flops=lambda n, d, keep, text_tokens, **_: zspaprune_flops(n, d, keep, text_tokens, core_ratio=0.0),
    summary="greedy max-min diversity (ZSPAPrune with r = 0)",
    citation="arXiv:2503.02175, github.com/vbdi/divprune",
)
