"""ZSPAPrune (arXiv 2510.17197) and its two ends, relevance-only (r = 1) and DivPrune (r = 0).

The six steps are README.md's "ZSPAPrune, exactly": a prompt-relevance core of
k = round(K r) tokens (top-k cosine to the mean prompt embedding), then a greedy max-min
diversity fill. The fill keeps a running c_j = max over kept i of cos(v_j, v_i): one
matrix-vector product per pick, no N x N matrix except for DivPrune's first pick.
`core_ratio="auto"` picks k per example (`zspa_jax.methods.auto_core`).

The fill first works on a prefix (`_prefix_fill`): c_j only grows, so the value c_j has
before the fill is a lower bound on it at every later pick. The P tokens with the lowest
bound are gathered once; a pick found among them whose c is strictly below the smallest
bound outside is the exact argmin over all N (ties go to the lower index, as in the plain
argmin), and each pick then updates only those P tokens. Picks run there while that holds;
the first time it does not, the remaining picks run the plain [N, D] loop from exactly
that point. Same kept indices; on data where the fill stays among the least-covered tokens
(e.g. unstructured features) each pick reads P rows instead of N.

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
from zspa_jax.methods.base import Method, MethodInputs, Option, Selection

AUTO = "auto"
DEFAULT_CORE_RATIO = 0.6

__all__ = [
    "AUTO",
    "CORE_RATIO",
    "DEFAULT_CORE_RATIO",
    "DIVPRUNE",
    "RELEVANCE",
    "ZSPAPRUNE",
    "core_size",
    "zspaprune_flops",
]

CORE_RATIO = Option(
    name="core_ratio",
    type=float,
    default=DEFAULT_CORE_RATIO,
    minimum=0.0,
    maximum=1.0,
    words=(AUTO,),
    help="r: the share of the budget kept by prompt relevance before the diversity fill; "
    "'auto': chosen per example from the relevance scores",
    official="0.6: this library's default (relevance and divprune are r = 1 and r = 0)",
)


def core_size(keep: int, core_ratio: float) -> int:
    """k = floor(K * r + 0.5) clipped to [0, K] (README "ZSPAPrune, exactly", step 4)."""
    return min(max(math.floor(keep * core_ratio + 0.5), 0), keep)


def _select_one(
    v: jax.Array,
    t: jax.Array,
    m: jax.Array,
    valid: jax.Array | None,
    *,
    keep: int,
    n_core: int,
    prefix: bool,
) -> jax.Array:
    """One example: v [N, D], t [T, D] f32, m [T] bool, valid [N] bool | None -> sorted int32 [keep].

    Masked tokens (valid False) get unit vector 0, relevance -inf and a running c of
    +inf, so they are never picked and never change another token's score. `prefix`: run
    the fill through `_prefix_fill` (sequential batching; under vmap its data-dependent
    exit and fallback would run for every example).
    """
    n = v.shape[0]
    if valid is not None:
        v = jnp.where(valid[:, None], v, 0.0)  # padding may hold NaN: keep it out of every sum
    vn = unit(v)  # a masked token's unit vector is 0
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

    if start == keep:  # K = 1 from DivPrune's first pick: no fill pick to make
        return picks

    # Step 5: greedy max-min fill with a running c_j = max_{i selected} cos(v_j, v_i).
    blocked = selected if valid is None else selected | ~valid
    size = prefix_size(n, keep - start) if prefix else None
    if size is None:
        return jnp.sort(_plain_fill(vn, c, blocked, picks, start, keep))
    return jnp.sort(_prefix_fill(vn, c, blocked, picks, start, keep, size))


def prefix_size(n: int, picks: int) -> int | None:
    """P, the tokens `_prefix_fill` works on for `picks` greedy picks out of n; None when
    there is no pick to make or P would not be smaller than n. Unstructured data (the
    hardest case for a prefix: every c_j close to the others) needs about 2-3 rows per pick
    plus a share growing with N."""
    if picks < 1:  # P would be 0 for n < 32: an empty prefix has no minimum to take
        return None
    size = -(-(4 * picks + n // 32) // 8) * 8
    return size if size < n else None


def _plain_fill(vn, c, blocked, picks, start, keep):
    """Picks start..keep-1: argmin of c over unblocked tokens, then one [N, D] matvec."""

    def fill(i, state):
        c, blocked, picks = state
        j = jnp.argmin(jnp.where(blocked, jnp.inf, c)).astype(jnp.int32)  # first occurrence
        c = jnp.maximum(c, jnp.einsum("nd,d->n", vn, vn[j], precision=HIGHEST))
        return c, blocked.at[j].set(True), picks.at[i].set(j)

    return lax.fori_loop(start, keep, fill, (c, blocked, picks))[2]


def _prefix_phase(vn, c, blocked, picks, start, keep, size: int):
    """The picks the `size` least-covered tokens decide: -> (t, picks with start..start+t-1 set).

    vn [N, D] unit tokens, c [N] running max to the selected set, blocked [N] (selected or
    masked), picks int32 [keep] (first `start` set).
    """
    n = vn.shape[0]
    count = keep - start
    bound = jnp.where(blocked, jnp.inf, c)  # c never decreases: a lower bound for every later pick
    order = jnp.argsort(bound, stable=True).astype(jnp.int32)
    idx = order[:size]
    rows = vn.at[idx].get(mode="promise_in_bounds", unique_indices=True)  # [P, D], cache-resident
    outside = bound[order[size]]  # the smallest bound of any token left out

    def cond(state):
        t, _, _, ok = state
        return ok & (t < count)

    def body(state):
        t, cp, picks, _ = state
        m = jnp.min(cp)
        pos = jnp.argmin(jnp.where(cp == m, idx, n)).astype(jnp.int32)  # ties -> lower token index
        ok = m < outside  # strictly: an outside token could only tie or lose
        cp_next = (
            jnp.maximum(cp, jnp.einsum("pd,d->p", rows, rows[pos], precision=HIGHEST))
            .at[pos]
            .set(jnp.inf)
        )
        cp = jnp.where(ok, cp_next, cp)
        picks = jnp.where(ok, picks.at[start + t].set(idx[pos]), picks)
        return t + ok.astype(jnp.int32), cp, picks, ok

    t, _, picks, _ = lax.while_loop(cond, body, (jnp.int32(0), bound[idx], picks, jnp.bool_(True)))
    return t, picks


def _prefix_fill(vn, c, blocked, picks, start, keep, size: int):
    """`_plain_fill`'s picks, exactly: `_prefix_phase`, then the plain loop for what it left."""
    n = vn.shape[0]
    count = keep - start
    t, picks = _prefix_phase(vn, c, blocked, picks, start, keep, size)

    def rest(args):
        # The prefix could not decide pick t: bring every token's c up to date with the t
        # prefix picks (one matvec each) and finish with the plain loop.
        t, picks = args
        made = jnp.where(jnp.arange(count) < t, picks[start:], n)
        done = blocked.at[made].set(True, mode="drop")
        caught = lax.fori_loop(
            0,
            t,
            lambda s, c: jnp.maximum(
                c, jnp.einsum("nd,d->n", vn, vn[picks[start + s]], precision=HIGHEST)
            ),
            c,
        )
        return _plain_fill(vn, caught, done, picks, start + t, keep)

    return lax.cond(t < count, rest, lambda args: args[1], (t, picks))


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
    prefix = batching == "map"
    if valid is None:
        one = lambda v, t, m: _select_one(v, t, m, None, keep=keep, n_core=n_core, prefix=prefix)  # noqa: E731
        args = (v, t, m)
    else:  # masking happens per example inside _select_one (no masked copy of the whole batch)
        one = partial(_select_one, keep=keep, n_core=n_core, prefix=prefix)
        args = (v, t, m, valid)
    return batched(one, args, batching)


def _select(
    inputs: MethodInputs, *, keep: int, batching: str, core_ratio: float | str
) -> Selection:
    """ZSPAPrune with r = core_ratio (a number, or "auto": `auto_core`)."""
    r = core_ratio
    if r == AUTO:
        return Selection(
            auto_core.select_auto(
                inputs.visual,
                inputs.prompt,
                inputs.prompt_mask,
                inputs.valid,
                keep=keep,
                batching=batching,
            )
        )
    kept = select_fixed_core(
        inputs.visual,
        inputs.prompt,
        inputs.prompt_mask,
        inputs.valid,
        keep=keep,
        n_core=core_size(keep, float(r)),
        batching=batching,
    )
    return Selection(kept)


def zspaprune_flops(
    n: int,
    d: int,
    keep: int,
    text_tokens: int,
    *,
    core_ratio: float | str = DEFAULT_CORE_RATIO,
    auto_zero_share: float = 1.0,
    **_,
) -> int:
    """FLOPs of one example (zspa_jax.estimate's convention; 0 when keep == n). The greedy
    fill is counted as the plain loop, one [N, D] matvec per pick. The prefix fill does
    less while its prefix decides the picks, and at most (K - k) x P x D more when it hands
    over late."""
    if keep >= n:
        return 0
    if core_ratio == AUTO:
        gram = 2 * n * n * d  # DivPrune's first pick, only when the core is empty
        return round(
            3 * n * d + 2 * text_tokens * d + 2 * n * d + 2 * keep * n * d + auto_zero_share * gram
        )
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
    options=(CORE_RATIO,),
)
RELEVANCE = Method(
    name="relevance",
    stage="embedding",
    select=partial(_select, core_ratio=1.0),
    flops=lambda n, d, keep, text_tokens, **_: zspaprune_flops(
        n, d, keep, text_tokens, core_ratio=1.0
    ),
    summary="the K tokens most cosine-similar to the mean prompt embedding (ZSPAPrune with r = 1)",
    citation="arXiv:2510.17197",
    needs_prompt=True,
)
DIVPRUNE = Method(
    name="divprune",
    stage="embedding",
    select=partial(_select, core_ratio=0.0),
    flops=lambda n, d, keep, text_tokens, **_: zspaprune_flops(
        n, d, keep, text_tokens, core_ratio=0.0
    ),
    summary="greedy max-min diversity (ZSPAPrune with r = 0)",
    citation="arXiv:2503.02175, github.com/vbdi/divprune",
)
