"""Prompt-aware visual-token pruning (ZSPAPrune) and the methods it is compared with.

`select_tokens` implements the six steps of README.md, "ZSPAPrune, exactly": a prompt-relevance core set (top-k cosine
to the mean prompt embedding) followed by a greedy max-min diversity fill;
`core_ratio="auto"` picks the core size per example (`zspa_jax.methods.auto_core`).
"relevance" (r = 1), "divprune" (r = 0), "random", "uniform", "cdpruner"
(`zspa_jax.methods.cdpruner`) and "vispruner" (`zspa_jax.methods.vispruner`, needs the
tower's [CLS] attention) share the signature. "visionzip" (merges tokens in the vision
tower) and "fastv" (prunes inside the LLM) need model internals: they run through
`PruneConfig` in `forward`/`generate`. Everything is computed in float32 and
jit-compiled once per (shapes, keep, method, core size).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zspa_jax.methods import auto_core
from zspa_jax.methods._common import HIGHEST, batched, unit
from zspa_jax.methods.cdpruner import cdpruner_select
from zspa_jax.methods.vispruner import vispruner_select
from zspa_jax.sharding import fetch
from zspa_jax.validation import check_rng, is_traced

__all__ = ["PRUNE_METHODS", "PruneConfig", "auto_core_ratio", "gather_tokens", "select_tokens"]

PRUNE_METHODS: tuple[str, ...] = (
    "zspaprune",
    "relevance",
    "divprune",
    "random",
    "uniform",
    "cdpruner",
    "vispruner",
    "visionzip",
    "fastv",
)
# Methods that read the vision tower's [CLS] attention / run inside the LLM.
CLS_ATTENTION_METHODS: tuple[str, ...] = ("vispruner", "visionzip")
MODEL_METHODS: tuple[str, ...] = ("visionzip", "fastv")  # not a function of (visual, prompt)
AUTO = "auto"
PROMPT_SCOPES: tuple[str, ...] = ("question", "all_text")



# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How many visual tokens to keep and how to choose them.

    Exactly one of `keep` (a count, >= 1) or `ratio` (fraction kept, in (0, 1]).
    `core_ratio`: r in [0, 1], or "auto" (zspaprune only: r chosen per example from the
    relevance scores, see `zspa_jax.methods.auto_core`). `fastv_layer`: the LLM layer K
    after which "fastv" drops visual tokens (1 <= K < number of decoder layers; the
    attention used is that of layer K's input, i.e. the K-th layer's, as FastV).
    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    keep: int | None = None
    ratio: float | None = None
    method: str = "zspaprune"
    core_ratio: float | str = 0.6
    prompt_scope: str = "question"
    fastv_layer: int = 2

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.ratio is None):
            raise ValueError(
                f"PruneConfig needs exactly one of keep or ratio, got keep={self.keep!r}, ratio={self.ratio!r}"
            )
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, np.integer)):
                raise ValueError(f"PruneConfig.keep must be an int >= 1, got {self.keep!r}")
            if self.keep < 1:
                raise ValueError(f"PruneConfig.keep must be >= 1, got {self.keep}")
            object.__setattr__(self, "keep", int(self.keep))
        if self.ratio is not None:
            if not _is_real(self.ratio) or not 0.0 < float(self.ratio) <= 1.0:
                raise ValueError(f"PruneConfig.ratio must be in (0, 1], got {self.ratio!r}")
            object.__setattr__(self, "ratio", float(self.ratio))
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"PruneConfig.method must be one of {PRUNE_METHODS}, got {self.method!r}")
        _check_core_ratio(self.core_ratio, self.method, "PruneConfig.core_ratio")
        if self.core_ratio != AUTO:
            object.__setattr__(self, "core_ratio", float(self.core_ratio))
        if isinstance(self.fastv_layer, bool) or not isinstance(self.fastv_layer, (int, np.integer)):
            raise ValueError(f"PruneConfig.fastv_layer must be an int, got {self.fastv_layer!r}")
        object.__setattr__(self, "fastv_layer", int(self.fastv_layer))
        if self.prompt_scope not in PROMPT_SCOPES:
            raise ValueError(
                f"PruneConfig.prompt_scope must be one of {PROMPT_SCOPES}, got {self.prompt_scope!r}"
            )

    def num_keep(self, n_visual: int) -> int:
        """Number of visual tokens kept out of `n_visual` (ratio rounds half up, min 1)."""
        n_visual = operator.index(n_visual)
        if n_visual < 1:
            raise ValueError(f"n_visual must be >= 1, got {n_visual}")
        if self.keep is not None:
            if self.keep > n_visual:
                raise ValueError(
                    f"PruneConfig.keep={self.keep} exceeds the number of visual tokens n_visual={n_visual}: "
                    f"method {self.method!r} cannot keep more tokens than there are left to prune"
                )
            return self.keep
        assert self.ratio is not None
        return max(1, math.floor(self.ratio * n_visual + 0.5))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_core_ratio(core_ratio: Any, method: str, name: str) -> None:
    if isinstance(core_ratio, str):
        if core_ratio != AUTO:
            raise ValueError(f"{name} must be a number in [0, 1] or 'auto', got {core_ratio!r}")
        if method != "zspaprune":
            raise ValueError(
                f"{name}='auto' chooses the size of ZSPAPrune's relevance core, but method {method!r} "
                "has no core ratio to choose (only 'zspaprune' does)"
            )
        return
    if not _is_real(core_ratio) or not 0.0 <= float(core_ratio) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or 'auto', got {core_ratio!r}")


def core_size(keep: int, core_ratio: float) -> int:
    """k = floor(K * r + 0.5) clipped to [0, K] (README "ZSPAPrune, exactly", step 4)."""
    return min(max(math.floor(keep * core_ratio + 0.5), 0), keep)


# --------------------------------------------------------------------------- public API


def gather_tokens(visual: jax.Array, indices: jax.Array) -> jax.Array:
    """Pick rows per example: visual [B, N, D], indices int [B, K] in [0, N) -> [B, K, D].

    Concrete indices outside [0, N) are a ValueError; traced ones are clamped into range
    (an index from `select_tokens` always is in range).
    """
    shapes = tuple(getattr(visual, "shape", ())), tuple(getattr(indices, "shape", ()))
    if len(shapes[0]) != 3 or len(shapes[1]) != 2 or shapes[1][0] != shapes[0][0]:
        raise ValueError(f"gather_tokens expects visual [B, N, D] and indices [B, K], got shapes {shapes[0]} and {shapes[1]}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer array [B, K], got dtype {indices.dtype}")
    n = shapes[0][1]
    if not is_traced(indices):
        host = fetch(indices)
        bad = (host < 0) | (host >= n)
        if bad.any():
            row, col = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"indices row {row} holds {int(host[row, col])}, outside [0, N={n})")
    return jnp.take_along_axis(visual, indices[:, :, None].astype(jnp.int32), axis=1, mode="clip")


def select_tokens(
    visual: jax.Array,
    prompt: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
    *,
    keep: int,
    method: str = "zspaprune",
    core_ratio: float | str = 0.6,
    rng: jax.Array | None = None,
    visual_mask: jax.Array | None = None,
    cls_attention: jax.Array | None = None,
) -> jax.Array:
    """Indices of the visual tokens to keep, int32 [B, keep], ascending per row.

    Args:
      visual: [B, N, D] tokens (any float dtype): the projected visual tokens, or for
        "vispruner" the tower features its similarity step uses (the pipeline passes the
        feature-layer hidden states, as the official code).
      prompt: [B, T, D] prompt token embeddings (any float dtype); needed by "zspaprune",
        "relevance" and "cdpruner", ignored (may be None) by the others.
      prompt_mask: [B, T], nonzero/True = real prompt token; None = all real.
        Masked tokens never influence the result (they may hold any value, even NaN).
        An all-masked row gives p = 0, so every relevance score is 0 and the core set
        is the first k indices.
      keep: K, 1 <= K <= N (static).
      method: one of PRUNE_METHODS except "visionzip"/"fastv" (static). "zspaprune" uses
        `core_ratio`; "relevance" is r = 1, "divprune" is r = 0; "random" needs `rng`;
        "uniform" is floor((i + 0.5) * N / K); "cdpruner" is the conditional DPP of
        `zspa_jax.methods.cdpruner`; "vispruner" needs `cls_attention`.
      core_ratio: r in [0, 1] or "auto" (static, only read by "zspaprune").
      rng: a JAX PRNG key, required by "random" (each batch row gets its own subset).
      visual_mask: [B, N], nonzero/True = real visual token; None = all real. Lets rows
        carry different numbers of tokens N_b <= N in one array: masked tokens are never
        chosen and never influence a choice (they may hold any value, even NaN), so a
        row gives exactly the indices of its N_b real tokens run alone (mapped back to
        their positions). Needs keep <= N_b in every row; "uniform" spaces the picks
        over the real tokens.
      cls_attention: [B, N] attention of the tower's [CLS] query to each of the N tokens,
        averaged over heads (`CLIPVisionModel.hidden_states(..., cls_attention_layer=...)`).

    Inputs are cast to float32 before anything else, so bf16/f16 inputs give exactly
    the indices of the same (bf16-valued) inputs upcast to f32. Deterministic methods
    give each batch row the result of running it alone. Ties go to the lower index.
    """
    _validate(visual, prompt, prompt_mask, keep, method, core_ratio, rng, cls_attention, visual_mask)
    keep = operator.index(keep)
    b, n, _ = visual.shape
    if method == "divprune" and prompt is None:
        prompt = jnp.zeros((b, 1, visual.shape[2]), jnp.float32)  # never read (r = 0)
    if visual_mask is not None:
        if method == "uniform":
            return _uniform_masked(visual_mask != 0, keep)
        if method == "random":
            return _random_impl(rng, b, n, keep, visual_mask != 0)
        r = {"relevance": 1.0, "divprune": 0.0}.get(method, float(core_ratio))
        return _select_impl(
            visual, prompt, prompt_mask, visual_mask != 0, keep=keep, n_core=core_size(keep, r), batching=_default_batching()
        )
    if method == "uniform" or keep == n:
        # Data-independent: a constant, no compile needed.
        idx = ((2 * np.arange(keep) + 1) * n) // (2 * keep)  # == floor((i + 0.5) * N / K), exactly
        return jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (b, keep))
    if method == "random":
        return _random_impl(rng, b, n, keep)
    batching = _default_batching()
    if method == "cdpruner":
        return cdpruner_select(visual, prompt, prompt_mask, keep=keep, batching=batching)
    if method == "vispruner":
        return vispruner_select(visual, cls_attention, keep=keep, batching=batching)
    if method == "zspaprune" and core_ratio == AUTO:
        return auto_core.select_auto(visual, prompt, prompt_mask, keep=keep, batching=batching)
    r = {"relevance": 1.0, "divprune": 0.0}.get(method, core_ratio)
    # Static key is (keep, n_core): methods that reduce to the same k share one compile.
    return _select_impl(visual, prompt, prompt_mask, None, keep=keep, n_core=core_size(keep, float(r)), batching=batching)


def auto_core_ratio(visual: jax.Array, prompt: jax.Array, prompt_mask: jax.Array | None = None, *, keep: int) -> jax.Array:
    """f32 [B]: the core ratio r that `core_ratio="auto"` picks for each example (see
    `zspa_jax.methods.auto_core`); the core holds round(r * keep) tokens."""
    _validate(visual, prompt, prompt_mask, keep, "zspaprune", AUTO, None, None)
    return auto_core.auto_core_ratio(visual, prompt, prompt_mask, keep=operator.index(keep))


_PROMPT_METHODS = ("zspaprune", "relevance", "cdpruner")
# Methods whose kernels take a visual_mask (rows with different numbers of real tokens).
MASKED_METHODS: tuple[str, ...] = ("zspaprune", "relevance", "divprune", "random", "uniform")


def _validate_visual_mask(visual_mask, b: int, n: int, keep: int) -> None:
    shape = tuple(getattr(visual_mask, "shape", ()))
    if shape != (b, n):
        raise ValueError(f"visual_mask must have shape [B, N] = {(b, n)}, got {shape}")
    if not is_traced(visual_mask):
        counts = fetch(jnp.asarray(visual_mask) != 0).sum(axis=1)
        if (counts < keep).any():
            row = int(np.argmax(counts < keep))
            raise ValueError(
                f"keep={keep} exceeds the {int(counts[row])} real visual tokens of row {row} (visual_mask); "
                "every row needs at least keep real tokens"
            )


@partial(jax.jit, static_argnames=("keep",))
def _uniform_masked(valid: jax.Array, keep: int) -> jax.Array:
    # floor((i + 0.5) * N_b / K) over each row's real tokens, mapped to their positions.
    n_b = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.int32)
    rank = ((2 * jnp.arange(keep, dtype=jnp.int32)[None] + 1) * n_b) // (2 * keep)
    real_positions = jnp.argsort(~valid, axis=1, stable=True)  # real tokens first, in order
    return jnp.take_along_axis(real_positions, rank, axis=1).astype(jnp.int32)


def _validate(visual, prompt, prompt_mask, keep, method, core_ratio, rng, cls_attention, visual_mask=None) -> None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    if method in MODEL_METHODS:
        where = "the vision tower ([CLS] attention and keys)" if method == "visionzip" else "the LLM's attention at layer K"
        raise ValueError(
            f"method {method!r} is not a function of (visual, prompt): it needs {where}; "
            f"use PruneConfig(method={method!r}) with zspa_jax.forward / zspa_jax.generate"
        )
    if prompt is None and method in _PROMPT_METHODS:
        raise ValueError(f"prompt [B, T, D] is required by method {method!r} (it scores tokens against the prompt)")
    arrays = (("visual", visual),) + ((("prompt", prompt),) if prompt is not None else ())
    for name, x in arrays:
        if not hasattr(x, "shape") or len(x.shape) != 3:
            want = "[B, N, D]" if name == "visual" else "[B, T, D]"
            raise ValueError(f"{name} must be a 3-D array {want}, got shape {getattr(x, 'shape', type(x))}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    b, n, d = visual.shape
    if prompt is not None:
        if prompt.shape[0] != b:
            raise ValueError(f"prompt batch size {prompt.shape[0]} must equal visual batch size {b}")
        if prompt.shape[2] != d:
            raise ValueError(f"prompt feature dim {prompt.shape[2]} must equal visual feature dim D={d}")
        if prompt_mask is not None:
            shape = tuple(getattr(prompt_mask, "shape", ()))
            if shape != prompt.shape[:2]:
                raise ValueError(f"prompt_mask must have shape [B, T] = {tuple(prompt.shape[:2])}, got {shape}")
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)):
        raise ValueError(f"keep must be a Python int in [1, N={n}], got {keep!r}")
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, N={n}] (number of visual tokens), got {keep}")
    _check_core_ratio(core_ratio, method, "core_ratio")
    if method == "random":
        if rng is None:
            raise ValueError("rng (a JAX PRNG key) is required for method='random'")
        check_rng("rng", rng)
    if method == "vispruner":
        if cls_attention is None:
            raise ValueError(
                "method 'vispruner' needs cls_attention [B, N], the vision tower's [CLS] attention to each "
                "token; a tower without a [CLS] token cannot provide it"
            )
        if tuple(getattr(cls_attention, "shape", ())) != (b, n):
            raise ValueError(
                f"cls_attention must have shape [B, N] = {(b, n)}, got {tuple(getattr(cls_attention, 'shape', ()))}"
            )
    if visual_mask is not None:
        if method not in MASKED_METHODS or core_ratio == AUTO:
            what = f"method {method!r}" + (" with core_ratio='auto'" if core_ratio == AUTO else "")
            raise ValueError(f"visual_mask is not supported by {what}; supported: {MASKED_METHODS} with a fixed core_ratio")
        _validate_visual_mask(visual_mask, b, n, keep)
    _check_finite_values(visual, prompt, prompt_mask, visual_mask)


def _check_finite_values(visual, prompt, prompt_mask, visual_mask=None) -> None:
    """NaN/Inf in a real visual token or in an unmasked prompt token: a ValueError naming
    the row. One on-device reduction per array; skipped when traced (inside a caller's jit)."""
    if is_traced(visual, prompt, prompt_mask, visual_mask):
        return
    finite_v = jnp.isfinite(jnp.asarray(visual))
    if visual_mask is not None:  # padding slots may hold anything
        finite_v |= ~(jnp.asarray(visual_mask) != 0)[..., None]
    checks = [("visual", fetch(jnp.all(finite_v, axis=(1, 2))))]
    if prompt is not None:
        finite = jnp.isfinite(jnp.asarray(prompt))
        if prompt_mask is not None:
            finite |= ~(jnp.asarray(prompt_mask) != 0)[..., None]
        checks.append(("prompt", fetch(jnp.all(finite, axis=(1, 2)))))
    for name, ok in checks:
        if not ok.all():
            raise ValueError(f"{name} row {int(np.argmin(ok))} holds NaN or Inf values; every value must be finite")


def _default_batching() -> str:
    # Measured (benchmarks/pruning.py): on CPU a sequential lax.map keeps one example's
    # [N, D] tokens cache-resident across the K fill steps and beats vmap; accelerators
    # want the parallel batched form.
    return "map" if jax.default_backend() == "cpu" else "vmap"


# --------------------------------------------------------------------------- kernels


@partial(jax.jit, static_argnames=("b", "n", "keep"))
def _random_impl(rng: jax.Array, b: int, n: int, keep: int, valid: jax.Array | None = None) -> jax.Array:
    # Top-K of iid uniforms is a uniformly random K-subset; one row of noise per example.
    u = jax.random.uniform(rng, (b, n))
    if valid is not None:
        u = jnp.where(valid, u, -1.0)  # padding ranks below every real token
    return jnp.sort(lax.top_k(u, keep)[1], axis=-1).astype(jnp.int32)


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
        # Steps 1-4: mean prompt (masked entries contribute an exact 0, whatever they hold).
        count = jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)
        p = jnp.sum(jnp.where(m[:, None], t, 0.0), axis=0) / count
        s = jnp.einsum("nd,d->n", vn, unit(p), precision=HIGHEST)
        s = jnp.where(s == 0.0, 0.0, s)  # top_k orders -0.0 below +0.0; equal scores must tie by index
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
def _select_impl(
    visual: jax.Array,
    prompt: jax.Array,
    prompt_mask: jax.Array | None,
    valid: jax.Array | None = None,
    *,
    keep: int,
    n_core: int,
    batching: str,
) -> jax.Array:
    """Batched `_select_one`: [B, N, D], [B, T, D], [B, T] | None, [B, N] | None -> int32 [B, keep]."""
    v = visual.astype(jnp.float32)
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
