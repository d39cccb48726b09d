"""ZSPAPrune with `core_ratio="auto"`: the core size chosen per example from the relevance scores.

The rule (quoted by the README):
  "auto" counts the visual tokens whose prompt relevance is an outlier above the bulk of
  the image, by the robust z-score rule of Iglewicz and Hoaglin (0.6745 (s_j - median s) /
  MAD(s) > 3.5), and sets r = min(count, K) / K, so the core holds exactly those tokens.
  A prompt that singles out a few regions makes a few tokens stand out and pushes r toward
  relevance-only selection, while a prompt that matches the whole image evenly (or no
  prompt at all) leaves r near 0, i.e. DivPrune's pure diversity.
  It reads nothing but ZSPAPrune's cosine relevance scores (no labels, no constant
  fitted to data), so it is deterministic, lies in [0, 1] and does not change when tokens
  or the prompt are scaled by positive factors.

(Scaling invariance is exact for power-of-two factors; other factors can move a unit
vector by a rounding error, which matters only for a score within that error of the cut.)
Median and MAD use the midpoint of the two middle values for even N. The comparison is
done as 0.6745 (s_j - med) > 3.5 MAD (no division), so MAD = 0 is well defined: then only
tokens strictly above the median count.

The selection itself is ZSPAPrune with a per-example core size k: the k most relevant
tokens (ties -> lower index), then the greedy max-min fill; k = 0 seeds the fill with
DivPrune's first pick. One `lax.fori_loop` over K takes the next core token while i < k
and the next fill token afterwards, so k may differ between batch rows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from zspa_jax.methods._common import HIGHEST, batched, prompt_relevance, unit

__all__ = ["auto_core_count", "auto_core_ratio", "select_auto"]

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin (1993) modified z-score threshold
MAD_CONSISTENCY = 0.6745  # Phi^{-1}(3/4): makes MAD comparable to a standard deviation


def _median(x: jax.Array, count: jax.Array | None = None) -> jax.Array:
    """Median of x [N], or of its first `count` values after sorting (masked entries +inf)."""
    srt = jnp.sort(x)
    n = x.shape[0] if count is None else count
    return 0.5 * (srt[(n - 1) // 2] + srt[n // 2])


def auto_core_count(s: jax.Array, keep: int, valid: jax.Array | None = None) -> jax.Array:
    """int32 k in [0, keep] from relevance scores s [N] (the rule in the module docstring);
    with `valid` [N], over the real tokens only."""
    if valid is None:
        med = _median(s)
        mad = _median(jnp.abs(s - med))
        outliers = MAD_CONSISTENCY * (s - med) > OUTLIER_Z * mad
    else:
        count = jnp.sum(valid.astype(jnp.int32))
        med = _median(jnp.where(valid, s, jnp.inf), count)
        mad = _median(jnp.where(valid, jnp.abs(s - med), jnp.inf), count)
        outliers = valid & (MAD_CONSISTENCY * (s - med) > OUTLIER_Z * mad)
    return jnp.minimum(jnp.sum(outliers.astype(jnp.int32)), keep).astype(jnp.int32)


def _prepare(v, t, m, valid=None):
    vn = unit(v)
    if valid is not None:
        vn = jnp.where(valid[:, None], vn, 0.0)
    return vn, prompt_relevance(vn, t, m)


def _divprune_first(vn: jax.Array, valid: jax.Array) -> jax.Array:
    n = vn.shape[0]
    g = jnp.einsum("nd,md->nm", vn, vn, precision=HIGHEST)
    others = ~jnp.eye(n, dtype=jnp.bool_) & valid[None, :]
    worst = jnp.where(valid, jnp.max(jnp.where(others, g, -jnp.inf), axis=1), jnp.inf)
    return jnp.argmin(worst).astype(jnp.int32)


def _select_auto_one(
    v: jax.Array, t: jax.Array, m: jax.Array, valid: jax.Array | None = None, *, keep: int
) -> jax.Array:
    """One example: v [N, D], t [T, D] f32, m bool [T], valid bool [N] | None -> sorted int32 [keep].
    Masked tokens are never picked and never change a score, the median or the MAD."""
    n = v.shape[0]
    vn, s = _prepare(v, t, m, valid)
    k = auto_core_count(s, keep, valid)
    real = jnp.ones((n,), jnp.bool_) if valid is None else valid
    order = jnp.argsort(-jnp.where(real, s, -jnp.inf), stable=True).astype(
        jnp.int32
    )  # most relevant first
    first = lax.cond(k == 0, _divprune_first, lambda *_: jnp.int32(0), vn, real)

    def step(i, state):
        c, selected, picks = state
        fill = jnp.argmin(jnp.where(selected, jnp.inf, c)).astype(jnp.int32)  # first occurrence
        j = jnp.where(i < k, order[i], jnp.where((k == 0) & (i == 0), first, fill))
        c = jnp.maximum(c, jnp.einsum("nd,d->n", vn, vn[j], precision=HIGHEST))
        return c, selected.at[j].set(True), picks.at[i].set(j)

    init = (jnp.full((n,), -jnp.inf, jnp.float32), ~real, jnp.zeros((keep,), jnp.int32))
    _, _, picks = lax.fori_loop(0, keep, step, init)
    return jnp.sort(picks)


def _inputs(visual, prompt, prompt_mask):
    t = prompt.astype(jnp.float32)
    m = jnp.ones(t.shape[:2], jnp.bool_) if prompt_mask is None else prompt_mask != 0
    return visual.astype(jnp.float32), t, m


@partial(jax.jit, static_argnames=("keep", "batching"))
def select_auto(
    visual: jax.Array,
    prompt: jax.Array,
    prompt_mask: jax.Array | None,
    valid: jax.Array | None = None,
    *,
    keep: int,
    batching: str = "vmap",
) -> jax.Array:
    """ZSPAPrune with the automatic core: [B, N, D], [B, T, D], [B, T] | None, [B, N] | None -> int32 [B, keep]."""
    v, t, m = _inputs(visual, prompt, prompt_mask)
    if valid is None:
        return batched(partial(_select_auto_one, keep=keep), (v, t, m), batching)
    v = jnp.where(valid[..., None], v, 0.0)  # padding may hold NaN
    return batched(partial(_select_auto_one, keep=keep), (v, t, m, valid), batching)


@partial(jax.jit, static_argnames=("keep",))
def auto_core_ratio(
    visual: jax.Array, prompt: jax.Array, prompt_mask: jax.Array | None, *, keep: int
) -> jax.Array:
    """The r that `core_ratio="auto"` uses for each example: f32 [B] in [0, 1] (= k / keep)."""

    def one(v, t, m):
        return auto_core_count(_prepare(v, t, m)[1], keep).astype(jnp.float32) / keep

    return jax.vmap(one)(*_inputs(visual, prompt, prompt_mask))
