"""The public pruning front: `PruneConfig`, `select_tokens`, `gather_tokens`, `auto_core_ratio`.

Every method is a record in `zspa_jax.methods` (ZSPAPrune and its r = 1 / r = 0 ends,
random, uniform, CDPruner, VisPruner, VisionZip, FastV, ...); this module validates
arguments against the record's capabilities and options and calls its select function
with its own options. Methods that need model internals (a whole tower layer, the LLM's
attention) run through `PruneConfig` in `forward`/`generate`. Everything is computed in
float32 and jit-compiled once per (shapes, keep, method, options).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zspa_jax.methods import METHODS, Method, MethodInputs, auto_core, get_method
from zspa_jax.methods._common import default_batching
from zspa_jax.methods.base import OptionValues
from zspa_jax.methods.zspaprune import core_size
from zspa_jax.sharding import fetch
from zspa_jax.validation import check_binary_mask, check_rng, is_traced

__all__ = [
    "PRUNE_METHODS",
    "PruneConfig",
    "auto_core_ratio",
    "core_size",
    "default_batching",
    "gather_tokens",
    "resolve_options",
    "select_tokens",
]

PRUNE_METHODS: tuple[str, ...] = tuple(METHODS)
PROMPT_SCOPES: tuple[str, ...] = ("question", "all_text")
BUDGETS: tuple[str, ...] = ("row", "image")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, init=False)
class PruneConfig:
    """How many visual tokens to keep and how to choose them.

    PruneConfig(keep=None, ratio=None, method="zspaprune", *, budget="row",
                prompt_scope="question", options=None, core_ratio=None, layer=None)

    Exactly one of `keep` (a count, >= 1) or `ratio` (fraction kept, in (0, 1]).
    `method`: a name in PRUNE_METHODS. `budget`: "row" (default) applies keep/ratio to all
    of a row's visual tokens together, whatever images they come from; "image" applies it
    to each image (every image keeps K; a row of I images keeps I * K), for methods that
    choose before the LLM. `prompt_scope`: which text is "the prompt" for the methods that
    read it: "question" (text after the last image) or "all_text".
    `options`: the method's hyperparameters by name (its record's `options`, e.g.
    {"core_ratio": "auto"} for zspaprune, {"layer": 3, "image_pivots": 2} for dart); an
    unknown name or a value out of range is a ValueError naming the method and its options.
    `core_ratio=` and `layer=` are shorthands for options={"core_ratio": ...} /
    {"layer": ...}, refused for a method without that option.

    `options` then holds every option of the method, defaults filled in (a read-only
    mapping). Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    keep: int | None
    ratio: float | None
    method: str
    budget: str
    prompt_scope: str
    options: OptionValues

    def __init__(
        self,
        keep: int | None = None,
        ratio: float | None = None,
        method: str = "zspaprune",
        *,
        budget: str = "row",
        prompt_scope: str = "question",
        options: Mapping[str, Any] | None = None,
        core_ratio: float | str | None = None,
        layer: int | None = None,
    ) -> None:
        if (keep is None) == (ratio is None):
            raise ValueError(
                f"PruneConfig needs exactly one of keep or ratio, got keep={keep!r}, ratio={ratio!r}"
            )
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)):
                raise ValueError(f"PruneConfig.keep must be an int >= 1, got {keep!r}")
            if keep < 1:
                raise ValueError(f"PruneConfig.keep must be >= 1, got {keep}")
            keep = int(keep)
        if ratio is not None:
            if not _is_real(ratio) or not 0.0 < float(ratio) <= 1.0:
                raise ValueError(f"PruneConfig.ratio must be in (0, 1], got {ratio!r}")
            ratio = float(ratio)
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"PruneConfig.method must be one of {PRUNE_METHODS}, got {method!r}")
        record = METHODS[method]
        if budget not in BUDGETS:
            raise ValueError(f"PruneConfig.budget must be one of {BUDGETS}, got {budget!r}")
        if budget == "image" and record.llm_layer:
            raise ValueError(
                f"PruneConfig.budget='image' is for methods that choose before the LLM; method {method!r} "
                "chooses inside it, over the row's visual tokens together: use budget='row'"
            )
        if prompt_scope not in PROMPT_SCOPES:
            raise ValueError(
                f"PruneConfig.prompt_scope must be one of {PROMPT_SCOPES}, got {prompt_scope!r}"
            )
        values = resolve_options(record, options, core_ratio=core_ratio, layer=layer)
        for name, value in (
            ("keep", keep),
            ("ratio", ratio),
            ("method", method),
            ("budget", budget),
            ("prompt_scope", prompt_scope),
            ("options", values),
        ):
            object.__setattr__(self, name, value)

    @property
    def record(self):
        """The method's record (`zspa_jax.methods.Method`)."""
        return METHODS[self.method]

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

    def keep_for(self, min_visual: int, min_image: int) -> int:
        """The K a method runs with: of the fewest tokens in a row ("row" budget) or in one
        image ("image" budget)."""
        return self.num_keep(min_image if self.budget == "image" else min_visual)

    def row_keep(self, min_visual: int, min_image: int, images: int) -> int:
        """Visual tokens each row keeps: K, or I * K for rows of I images under budget="image"."""
        keep = self.keep_for(min_visual, min_image)
        return keep * images if self.budget == "image" else keep


def resolve_options(
    record: Method, options: Mapping[str, Any] | None = None, **shorthands: Any
) -> OptionValues:
    """Every option of `record`'s method, checked, defaults filled in: `options` plus the
    shorthand keywords that are not None (`core_ratio=`, `layer=`). A shorthand for an
    option the method lacks, or an option given twice, is a ValueError."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"options must be a mapping of option names to values, got {type(options).__name__}"
        )
    given = dict(options or {})
    for name, value in shorthands.items():
        if value is None:
            continue
        if record.option(name) is None:
            owners = [m.name for m in METHODS.values() if m.option(name) is not None]
            raise ValueError(
                f"{name}={value!r}: method {record.name!r} has no {name} option "
                f"({record.known_options()}); methods with one: {', '.join(owners)}"
            )
        if name in given:
            raise ValueError(f"option {name} given twice: as {name}= and in options")
        given[name] = value
    return record.resolve_options(given)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# --------------------------------------------------------------------------- public API


def gather_tokens(visual: jax.Array, indices: jax.Array) -> jax.Array:
    """Pick rows per example: visual [B, N, D], indices int [B, K] in [0, N) -> [B, K, D].

    Concrete indices outside [0, N) are a ValueError; traced ones are clamped into range
    (an index from `select_tokens` always is in range).
    """
    shapes = tuple(getattr(visual, "shape", ())), tuple(getattr(indices, "shape", ()))
    if len(shapes[0]) != 3 or len(shapes[1]) != 2 or shapes[1][0] != shapes[0][0]:
        raise ValueError(
            f"gather_tokens expects visual [B, N, D] and indices [B, K], got shapes {shapes[0]} and {shapes[1]}"
        )
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
    options: Mapping[str, Any] | None = None,
    core_ratio: float | str | None = None,
    visual_mask: jax.Array | None = None,
    rng: jax.Array | None = None,
    cls_attention: jax.Array | None = None,
) -> jax.Array:
    """Indices of the visual tokens to keep, int32 [B, keep], ascending per row.

    Args:
      visual: [B, N, D] tokens (any float dtype): the projected visual tokens, or for
        "vispruner" the tower features its similarity step uses (the pipeline passes the
        feature-layer hidden states, as the official code).
      prompt: [B, T, D] prompt token embeddings (any float dtype); needed by the methods
        whose record says `needs_prompt` ("zspaprune", "relevance", "cdpruner"), ignored
        (may be None) by the others.
      prompt_mask: [B, T], nonzero/True = real prompt token; None = all real.
        Masked tokens never influence the result (they may hold any value, even NaN).
        An all-masked row gives p = 0, so every relevance score is 0 and the core set
        is the first k indices.
      keep: K, 1 <= K <= N (static).
      method: a name in PRUNE_METHODS whose record is a function of these arrays (not the
        ones that read a whole tower layer, merge tokens or run inside the LLM) (static).
        "zspaprune" reads its `core_ratio` option; "relevance" is r = 1, "divprune" is
        r = 0; "random" needs `rng`; "uniform" is floor((i + 0.5) * N / K); "cdpruner" is
        the conditional DPP of `zspa_jax.methods.cdpruner`; "vispruner" needs
        `cls_attention`.
      options: the method's options by name (static; as `PruneConfig(options=)`).
      core_ratio: shorthand for options={"core_ratio": r}: r in [0, 1] or "auto"
        (zspaprune; refused by methods without a core).
      rng: a JAX PRNG key, required by "random" (each batch row gets its own subset).
      visual_mask: [B, N], nonzero/True = real visual token; None = all real. Lets rows
        carry different numbers of tokens N_b <= N in one array: masked tokens are never
        chosen and never influence a choice (they may hold any value, even NaN), so a
        row gives exactly the indices of its N_b real tokens run alone (mapped back to
        their positions). Needs keep <= N_b in every row; "uniform" spaces the picks
        over the real tokens. Methods whose record says `accepts_mask`.
      cls_attention: [B, N] attention of the tower's [CLS] query to each of the N tokens,
        averaged over heads (`CLIPVisionModel.hidden_states(..., cls_attention_layer=...)`).

    Inputs are cast to float32 before anything else, so bf16/f16 inputs give exactly
    the indices of the same (bf16-valued) inputs upcast to f32. Deterministic methods
    give each batch row the result of running it alone. Ties go to the lower index.
    """
    record, values = _validate(
        visual,
        prompt,
        prompt_mask,
        keep,
        method,
        rng,
        cls_attention,
        visual_mask,
        options,
        core_ratio,
    )
    keep = operator.index(keep)
    b, n, _ = visual.shape
    valid = None if visual_mask is None else jnp.asarray(visual_mask) != 0
    if keep == n and valid is None:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # nothing to choose
    inputs = MethodInputs(visual, valid, prompt, prompt_mask, rng, cls_attention, None)
    return record.select(
        inputs, keep=keep, batching=default_batching(), **record.select_options(values)
    ).kept


def auto_core_ratio(
    visual: jax.Array, prompt: jax.Array, prompt_mask: jax.Array | None = None, *, keep: int
) -> jax.Array:
    """f32 [B]: the core ratio r that `core_ratio="auto"` picks for each example (see
    `zspa_jax.methods.auto_core`); the core holds round(r * keep) tokens."""
    _validate(visual, prompt, prompt_mask, keep, "zspaprune", None, None, core_ratio="auto")
    return auto_core.auto_core_ratio(visual, prompt, prompt_mask, keep=operator.index(keep))


def _validate_visual_mask(visual_mask, b: int, n: int, keep: int) -> None:
    shape = tuple(getattr(visual_mask, "shape", ()))
    if shape != (b, n):
        raise ValueError(f"visual_mask must have shape [B, N] = {(b, n)}, got {shape}")
    if not is_traced(visual_mask):
        check_binary_mask("visual_mask", fetch(jnp.asarray(visual_mask)))
        counts = fetch(jnp.asarray(visual_mask) != 0).sum(axis=1)
        if (counts < keep).any():
            row = int(np.argmax(counts < keep))
            raise ValueError(
                f"keep={keep} exceeds the {int(counts[row])} real visual tokens of row {row} (visual_mask); "
                "every row needs at least keep real tokens"
            )


def _validate(
    visual,
    prompt,
    prompt_mask,
    keep,
    method,
    rng,
    cls_attention,
    visual_mask=None,
    options=None,
    core_ratio=None,
):
    """Check select_tokens' arguments against the method's record; returns the record and
    the method's option values."""
    record = get_method(method)
    if record.llm_layer or record.needs_tower or record.merges:
        where = (
            "the LLM's attention at layer K"
            if record.llm_layer
            else (
                "the vision tower ([CLS] attention and keys)"
                if record.needs_tower
                else "to replace tokens by merged ones"
            )
        )
        raise ValueError(
            f"method {method!r} is not a function of (visual, prompt): it needs {where}; "
            f"use PruneConfig(method={method!r}) with zspa_jax.forward / zspa_jax.generate"
        )
    if prompt is None and record.needs_prompt:
        raise ValueError(
            f"prompt [B, T, D] is required by method {method!r} (it scores tokens against the prompt)"
        )
    arrays = (("visual", visual),) + ((("prompt", prompt),) if prompt is not None else ())
    for name, x in arrays:
        if not hasattr(x, "shape") or len(x.shape) != 3:
            want = "[B, N, D]" if name == "visual" else "[B, T, D]"
            raise ValueError(
                f"{name} must be a 3-D array {want}, got shape {getattr(x, 'shape', type(x))}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    b, n, d = visual.shape
    if prompt is not None:
        if prompt.shape[0] != b:
            raise ValueError(
                f"prompt batch size {prompt.shape[0]} must equal visual batch size {b}"
            )
        if prompt.shape[2] != d:
            raise ValueError(
                f"prompt feature dim {prompt.shape[2]} must equal visual feature dim D={d}"
            )
        if prompt_mask is not None:
            shape = tuple(getattr(prompt_mask, "shape", ()))
            if shape != prompt.shape[:2]:
                raise ValueError(
                    f"prompt_mask must have shape [B, T] = {tuple(prompt.shape[:2])}, got {shape}"
                )
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)):
        raise ValueError(f"keep must be a Python int in [1, N={n}], got {keep!r}")
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, N={n}] (number of visual tokens), got {keep}")
    values = resolve_options(record, options, core_ratio=core_ratio)
    if record.needs_rng:
        if rng is None:
            raise ValueError(f"rng (a JAX PRNG key) is required for method={method!r}")
        check_rng("rng", rng)
    if record.needs_cls_attention:
        if cls_attention is None:
            raise ValueError(
                f"method {method!r} needs cls_attention [B, N], the vision tower's [CLS] attention to each "
                "token; a tower without a [CLS] token cannot provide it"
            )
        if tuple(getattr(cls_attention, "shape", ())) != (b, n):
            raise ValueError(
                f"cls_attention must have shape [B, N] = {(b, n)}, got {tuple(getattr(cls_attention, 'shape', ()))}"
            )
    if visual_mask is not None:
        if not record.accepts_mask:
            supported = tuple(
                m.name for m in METHODS.values() if m.accepts_mask and not (m.llm_layer or m.merges)
            )
            raise ValueError(
                f"visual_mask is not supported by method {method!r}; supported: {supported}"
            )
        _validate_visual_mask(visual_mask, b, n, keep)
    _check_finite_values(visual, prompt, prompt_mask, visual_mask)
    return record, values


@jax.jit
def _finite_rows(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """bool [B]: row b's unmasked vectors hold only finite values. x [B, L, D], mask [B, L] | None.

    x * 0 is 0 for a finite value and NaN for NaN or Inf, so one fused sum over D reads
    x once (an isfinite-and-all reduction runs at a third of the bandwidth on CPU).
    """
    ok = jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0, axis=-1))
    if mask is not None:  # masked slots may hold anything
        ok |= mask == 0
    return jnp.all(ok, axis=-1)


def _check_finite_values(visual, prompt, prompt_mask, visual_mask=None) -> None:
    """NaN/Inf in a real visual token or in an unmasked prompt token: a ValueError naming
    the row. One on-device pass per array; skipped when traced (inside a caller's jit)."""
    if is_traced(visual, prompt, prompt_mask, visual_mask):
        return
    checks = [("visual", fetch(_finite_rows(jnp.asarray(visual), visual_mask)))]
    if prompt is not None:
        checks.append(("prompt", fetch(_finite_rows(jnp.asarray(prompt), prompt_mask))))
    for name, ok in checks:
        if not ok.all():
            raise ValueError(
                f"{name} row {int(np.argmin(ok))} holds NaN or Inf values; every value must be finite"
            )
