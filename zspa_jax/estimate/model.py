"""The whole-model estimate: the family's image side (its `Family.estimate` hooks) + the
shared LLM side (flops.py, memory.py). `estimate` (LLaVA) and `estimate_qwen2_5_vl` are
the same call with the family's arguments; `mesh_bytes` is memory.py's per-device split
with the family's model.

The estimator's entry by config, with the CLI above it: the only part of the estimate
package that looks a config's family up in the registry (the core, flops.py, memory.py,
hooks.py and presets.py, imports nothing from zspa_jax.families)."""

from __future__ import annotations

from zspa_jax.estimate.flops import language_model_flops
from zspa_jax.estimate.hooks import EstimateHooks
from zspa_jax.estimate.memory import (
    _kv_bytes,
    _numel_llm,
    decode_weight_bytes,
    dtype_bytes,
    kv_cache_bytes,
    model_mesh_bytes,
)
from zspa_jax.families import family_of
from zspa_jax.methods import get_method
from zspa_jax.methods.base import check_layer
from zspa_jax.pruning import PruneConfig

__all__ = ["estimate", "estimate_model", "estimate_qwen2_5_vl", "hooks_of", "mesh_bytes"]


def mesh_bytes(
    cfg, axis_sizes: dict[str, int], batch: int, length: int, kv_dtype_bytes: int | None = None
) -> dict:
    """Per-device bytes of `cfg`'s family model on a ("data", "model") mesh
    (`memory.model_mesh_bytes`, its docstring)."""
    return model_mesh_bytes(
        cfg, family_of(cfg).model_cls, axis_sizes, batch, length, kv_dtype_bytes
    )


def hooks_of(cfg) -> EstimateHooks:
    """The estimate hooks of `cfg`'s family (`Family.estimate`)."""
    family = family_of(cfg)
    if family.estimate is None:
        raise TypeError(f"the {family.display_name} family has no estimate hooks (Family.estimate)")
    return family.estimate


def estimate_model(
    cfg,
    text_tokens: int,
    image_hw: tuple[int, int] | None = None,
    prune: PruneConfig | None = None,
    *,
    new_tokens: int = 0,
    batch: int = 1,
    kv_dtype_bytes: int | None = None,
    video: tuple[int, int, int] | None = None,
    fps: float | None = None,
) -> dict:
    """FLOPs per stage and bytes for one call of any family's model (flops.py's convention).

    Args:
      cfg: a family config (LlavaConfig, Qwen2_5_VLConfig, ...).
      text_tokens: T, text tokens of the prompt (everything but the image placeholders).
      image_hw: (height, width) pixels of the image, for families whose visual token count
        follows the image (ignored by fixed-size families such as LLaVA).
      prune: a `zspa_jax.PruneConfig` (None: all N visual tokens, no pruning): its keep or
        ratio gives K (for a [CLS]-attention method on a family whose tower rows are crops,
        LLaVA-NeXT, K of each crop); its method and options set the selection cost, and a
        method inside the LLM changes the LLM prefill, decode and KV cache instead (layers
        before its `layer` option keep all N tokens). Methods that read the tower's [CLS]
        token are refused for towers without one.
      new_tokens: tokens generated after the prompt (sizes the KV cache and the decode cost).
      batch: B prompts (one image each).
      kv_dtype_bytes: bytes per KV-cache element (default: the decoder's dtype).
      video: (frames, height, width) of one clip per prompt instead of an image (families
        that take video: Qwen2.5-VL); K then counts over the clip's tokens together.
      fps: the clip's frame rate (only its temporal positions depend on it).
    Returns a flat dict of ints/floats (FLOPs, bytes, token counts).
    """
    if prune is not None and not isinstance(prune, PruneConfig):
        raise TypeError(f"prune must be a zspa_jax.PruneConfig or None, got {type(prune).__name__}")
    hooks = hooks_of(cfg)
    if video is not None:
        if hooks.video is None:
            raise ValueError(f"the {family_of(cfg).display_name} family takes no video")
        if image_hw is not None:
            raise ValueError("give image_hw or video, not both (one visual input per prompt)")
    method = "zspaprune" if prune is None else prune.method
    record = get_method(method)
    dims = hooks.tower_dims(cfg)
    if record.needs_cls_attention and dims is None:
        raise ValueError(
            f"method {method!r} needs a [CLS] token, which the {family_of(cfg).display_name} tower does not have"
        )
    if prune is not None and record.llm_layer:
        check_layer(cfg.text.num_hidden_layers, prune.options["layer"], method)
    plan = (
        hooks.video(cfg, tuple(video), fps)
        if video is not None
        else hooks.image(cfg, image_hw if hooks.image_sized else None)
    )
    n = plan.visual_tokens
    per_row = record.stage == "tower" and plan.tower_rows is not None and prune is not None
    if per_row:  # K of each tower row (a crop): the LLM sees R * K tokens
        rows, row_tokens = plan.tower_rows
        if prune.keep is not None and not 1 <= prune.keep <= row_tokens:
            raise ValueError(
                f"keep must be in [1, {row_tokens}] (the tokens of one crop; {method!r} keeps K of "
                f"each of the image's {rows} crops), got {prune.keep}"
            )
        keep = rows * prune.num_keep(row_tokens)
    elif prune is None:
        keep = n
    else:
        if prune.keep is not None and not 1 <= prune.keep <= n:
            raise ValueError(f"keep must be in [1, {n}] ({plan.label}), got {prune.keep}")
        keep = prune.num_keep(n)
    if text_tokens < 0 or new_tokens < 0 or batch < 1:
        raise ValueError(
            f"need text_tokens >= 0, new_tokens >= 0, batch >= 1; got {text_tokens}, {new_tokens}, {batch}"
        )
    t = cfg.text
    weight_bytes_per = dtype_bytes(t.dtype)
    kv_bytes_per = weight_bytes_per if kv_dtype_bytes is None else int(kv_dtype_bytes)
    length = text_tokens + keep
    length_full = text_tokens + n

    vision = batch * hooks.vision_flops(cfg, plan)
    # A method merging in tower space hands the projector only its K tokens.
    projector = batch * hooks.projector_flops(
        cfg, keep if record.stage == "tower" and record.merges else n
    )
    pruning, prefill, prefill_full, decode_total, decode_per_token = language_model_flops(
        t,
        n,
        keep,
        text_tokens,
        new_tokens,
        batch,
        method,
        None if prune is None else prune.options,
        tower_dims=dims,
        tower_rows=plan.tower_rows if per_row else None,
    )

    w_vision = hooks.vision_weight_bytes(cfg)
    w_projector = hooks.projector_weight_bytes(cfg)
    w_llm = _numel_llm(t) * weight_bytes_per
    inside_llm = prune is not None and record.llm_layer
    kv = _kv_bytes(
        t,
        batch,
        length + new_tokens,
        kv_bytes_per,
        inside_llm,
        n - keep,
        prune.options["layer"] if inside_llm else 0,
    )

    out = {
        "batch": batch,
        **(plan.report or {}),
        "visual_tokens": n,
        "kept_tokens": keep,
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "sequence_length": length,
        "sequence_length_unpruned": length_full,
        "vision_tokens_in_tower": plan.tower_tokens,
        **hooks.tower_report(cfg),
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
    }
    if hooks.reports_decode_weights:
        out["decode_weight_bytes_per_token"] = decode_weight_bytes(t, weight_bytes_per)
    return out


def estimate(
    cfg,
    text_tokens: int,
    prune: PruneConfig | None = None,
    *,
    new_tokens: int = 0,
    batch: int = 1,
    kv_dtype_bytes: int | None = None,
) -> dict:
    """FLOPs per stage and bytes for one LLaVA call (`estimate_model` without an image size;
    flops.py's docstring has the convention).

    Args:
      cfg: a `models.llava.LlavaConfig`.
      text_tokens: T, text tokens of the prompt (everything but the image placeholders).
      prune: a `zspa_jax.PruneConfig` (None: no pruning), as in `estimate_model`.
      new_tokens: tokens generated after the prompt (sizes the KV cache and the decode cost).
      batch: B prompts (one image each).
      kv_dtype_bytes: bytes per KV-cache element (default: the decoder's dtype).
    Returns a flat dict of ints/floats (FLOPs, bytes, token counts).
    """
    return estimate_model(
        cfg,
        text_tokens,
        None,
        prune,
        new_tokens=new_tokens,
        batch=batch,
        kv_dtype_bytes=kv_dtype_bytes,
    )


def estimate_qwen2_5_vl(
    cfg,
    text_tokens: int,
    image_hw: tuple[int, int],
    prune: PruneConfig | None = None,
    *,
    new_tokens: int = 0,
    batch: int = 1,
    kv_dtype_bytes: int | None = None,
) -> dict:
    """FLOPs per stage and bytes for one Qwen2.5-VL call on an image of image_hw = (height,
    width) pixels (`estimate_model`; zspa_jax.families.qwen2_5_vl.estimate's docstring). Same keys as
    `estimate` (bar decode_weight_bytes_per_token and vision_layers_run), plus the image
    size and grid. Methods that need the tower's [CLS] token are refused: this tower has none."""
    return estimate_model(
        cfg,
        text_tokens,
        image_hw,
        prune,
        new_tokens=new_tokens,
        batch=batch,
        kv_dtype_bytes=kv_dtype_bytes,
    )
