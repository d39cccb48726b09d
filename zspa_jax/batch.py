"""The generic host path: user arrays -> a checked `HostBatch` -> arrays placed for the programs.

`forward`, `generate` and `generate_tokens` call `visual_args` (the family's visual arrays
by the names its record declares), `prepare_arrays` (the family's adapter checks its
arrays and spans, zspa_jax.host applies the rules every family shares, the adapter lays
out the rest, all before any compile; the method's needs are checked against the family's
record; a batch that does not divide the mesh's "data" axis is padded with copies of its
last row) and `device_arrays` (placement on the mesh). Nothing here names a family or a
method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from zspa_jax.families import family_of, video_arg_names, visual_arg_names
from zspa_jax.host import HostBatch, build_host_batch
from zspa_jax.loading import check_vlm
from zspa_jax.prefill import check_layer
from zspa_jax.pruning import PruneConfig
from zspa_jax.sharding import data_size, padded_rows, place, place_tree
from zspa_jax.validation import is_traced

__all__ = [
    "device_arrays",
    "encode",
    "kept_per_row",
    "prepare_arrays",
    "resolve_prune",
    "visual_args",
]


def visual_args(vlm, given: dict[str, Any]) -> dict[str, Any]:
    """The given (not None) visual arrays, by the names the family's record declares
    (`Family.visual_args`); a name no family takes is a TypeError, one this family does not
    take a ValueError, each naming it."""
    family = family_of(vlm)
    extras = {name: value for name, value in given.items() if value is not None}
    for name in extras:
        if name in family.visual_args:
            continue
        known = visual_arg_names()
        if name not in known:
            raise TypeError(
                f"unexpected keyword argument {name!r}: not a parameter, nor a visual array of any "
                f"model family ({', '.join(known)})"
            )
        if name in video_arg_names():
            raise ValueError(
                f"{name} was given: video input is not supported by {family.display_name} models (images only)"
            )
        takes = (
            f"; it takes {', '.join(family.visual_args)}"
            if family.visual_args
            else " (a fixed image size)"
        )
        raise ValueError(f"{name} is not used by {family.display_name} models{takes}")
    return extras


def resolve_prune(prune: PruneConfig | None, batch: HostBatch) -> PruneConfig | None:
    """A keep-count PruneConfig for this batch (a ratio applies to the fewest real tokens of
    a row, or of an image under budget="image"), or None when there is nothing to prune."""
    if prune is None or batch.pixel_values is None:
        return None
    keep = prune.keep_for(
        batch.min_visual, batch.min_image_visual or batch.min_visual
    )  # raises when too many
    return dataclasses.replace(prune, keep=keep, ratio=None)


def kept_per_row(prune: PruneConfig, batch: HostBatch) -> int:
    """Visual tokens each row keeps under a resolved `prune` (I * K for I images per image;
    R * K entries for a tower-stage method on R tower rows per row, masked ones included)."""
    if batch.tower_rows_per_row and prune.record.needs_cls_attention:
        return prune.keep * batch.tower_rows_per_row
    images = 1 if batch.images_per_row is None else int(np.max(batch.images_per_row))
    return prune.keep * images if prune.budget == "image" else prune.keep


def check_prune_for(vlm, prune: PruneConfig | None) -> None:
    """The method's needs against the family's capabilities and the model (its tower's
    [CLS] layer; the decoder's depth bounds an in-LLM method's layer option)."""
    if prune is None:
        return
    family_of(vlm).check_method(prune, vlm.model)
    if prune.record.llm_layer:
        check_layer(vlm.config.text.num_hidden_layers, prune.options["layer"], prune.method)


def prepare_arrays(
    vlm,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    extras: dict[str, Any] | None = None,
    prune=None,
    extra_length=0,
    bucket=False,
    prompt_bucket: Callable[[int], int] | None = None,
) -> HostBatch:
    """Validate arrays (before any compile) and build the family's host batch.

    `extras`: the family's other visual arrays by name (`visual_args`). `bucket`: pad the
    family's image-dependent shapes to buckets (e.g. Qwen2.5-VL's tower windows and pruned
    image spans), so images of different sizes share compiled programs. `prompt_bucket`:
    left-pad the prompt to the length this gives (`zspa_jax.host.prompt_bucket`).
    """
    adapter = family_of(vlm).adapter
    extras = dict(extras or {})
    if pixel_values is not None or extras.get("pixel_values_videos") is not None:
        check_prune_for(vlm, prune)
    batch = build_host_batch(
        vlm,
        adapter,
        input_ids,
        pixel_values,
        attention_mask,
        extras,
        prune,
        extra_length,
        bucket,
        prompt_bucket,
    )
    _check_layout(prune, batch)
    rows = int(np.shape(batch.input_ids)[0])
    target = padded_rows(rows, vlm.mesh)
    if target == rows:
        return batch
    if is_traced(input_ids, pixel_values, attention_mask, *extras.values()):
        raise ValueError(
            f"a batch of {rows} rows does not divide the mesh axis 'data' ({data_size(vlm.mesh)}) and traced "
            "arrays cannot be padded: pass a multiple of it, or concrete arrays"
        )
    # Validated above: pad with copies of the last row (and its images), run again.
    ids, pixels, mask, extras = _repeat_last_row(
        adapter, vlm, input_ids, pixel_values, attention_mask, extras, target - rows
    )
    batch = build_host_batch(
        vlm, adapter, ids, pixels, mask, extras, prune, extra_length, bucket, prompt_bucket
    )
    return batch._replace(rows=rows)


def _check_layout(prune: PruneConfig | None, batch: HostBatch) -> None:
    """What the budget and the method need of the images in each row: the same number of
    images per row under budget="image"; one image per row where the method reads one
    image's tower or grid under budget="row"; and the method's own check of each grid
    (e.g. that pooling to K tokens fits it)."""
    if prune is None or batch.pixel_values is None:
        return
    images = None if batch.images_per_row is None else np.asarray(batch.images_per_row)
    method = prune.record
    per_image = method.stage == "tower" or method.needs_grid
    if prune.budget == "image":
        if images is not None and images.min() != images.max():
            raise ValueError(
                f"budget='image' needs the same number of images in every prompt of a batch, got {images.tolist()} "
                "images per prompt: batch prompts by image count, or use budget='row'"
            )
    elif per_image and images is not None and images.max() > 1:
        what = (
            "the vision tower's [CLS] attention of one image"
            if method.stage == "tower"
            else "one image's token grid"
        )
        raise ValueError(
            f"method {prune.method!r} reads {what}, and a prompt holds {int(images.max())} images: use "
            "PruneConfig(budget='image') to prune each image on its own"
        )
    if not method.needs_grid:
        return
    if batch.image_grid is None:
        raise ValueError(
            f"method {prune.method!r} needs each image's visual tokens as a 2-D grid; this model's visual tokens are "
            "not one (e.g. a [CLS] token among them)"
        )
    if method.check_layout is not None:
        grids = np.asarray(batch.image_grid).reshape(-1, 2)
        keep = prune.keep_for(batch.min_visual, batch.min_image_visual or batch.min_visual)
        method.check_layout(grids[(grids > 0).all(axis=1)], keep)


def _repeat_last_row(
    adapter, vlm, input_ids, pixel_values, attention_mask, extras: dict, extra: int
):
    """The batch with its last row (and that row's visual arrays) appended `extra` more times."""
    ids = np.asarray(input_ids)
    mask = None if attention_mask is None else np.asarray(attention_mask)
    tails = adapter.last_row_arrays(vlm, ids, extras)  # {name: the last row's trailing entries}
    repeat = lambda x, n: np.concatenate([x] + [x[len(x) - n :]] * extra) if n else x  # noqa: E731
    ids = repeat(ids, 1)
    mask = None if mask is None else repeat(mask, 1)
    pixels = (
        None
        if pixel_values is None
        else repeat(np.asarray(pixel_values), tails.get("pixel_values", 0))
    )
    extras = {name: repeat(np.asarray(value), tails.get(name, 0)) for name, value in extras.items()}
    return ids, pixels, mask, extras


def device_arrays(batch: HostBatch, mesh) -> tuple[Any, Any, Any, Any]:
    """(input_ids int32, attention_mask int32, pixel_values f32 | None, aux) as the jitted
    programs take them: on `mesh`, rows split over "data" and aux replicated; traced
    arrays (a caller's jit) pass through for that jit to place."""
    ids, mask, pixels = batch.input_ids, batch.attention_mask, batch.pixel_values
    if mask is None:
        mask = np.ones(np.shape(ids), np.int32)
    if mesh is None or is_traced(ids, mask, pixels):
        pixels = None if pixels is None else jnp.asarray(pixels, jnp.float32)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), pixels, batch.aux
    pixels = None if pixels is None else place(np.asarray(pixels, np.float32), mesh, "data")
    return (
        place(np.asarray(ids, np.int32), mesh, "data"),
        place(np.asarray(mask, np.int32), mesh, "data"),
        pixels,
        place_tree(batch.aux, mesh),
    )


def encode(
    vlm,
    prompts: str | Sequence[str],
    images=None,
    *,
    chat_template: bool | None = None,
    videos=None,
) -> dict[str, np.ndarray]:
    """Strings + images (+ videos) -> exactly the arrays the array API takes (transformers'
    names: input_ids, attention_mask, pixel_values, and the family's `visual_args` such as
    Qwen2.5-VL's image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts),
    through the checkpoint's saved processor.

        batch = zspa_jax.encode(vlm, ["What is on the table?"], [image])
        logits = zspa_jax.forward(vlm, **batch)

    `videos` (families that take video, e.g. Qwen2.5-VL): one entry per prompt, None, a
    video (a list of PIL frames, an array [T, H, W, C], or a `zspa_jax.Video` with its frame
    rate and sampling) or a list of that prompt's videos.
    """
    check_vlm(vlm)
    family = family_of(vlm)
    if videos is None:
        return family.adapter.encode(vlm, prompts, images, chat_template)
    if not family.video_args:
        raise ValueError(
            f"videos were given: video input is not supported by {family.display_name} models (images only)"
        )
    return family.adapter.encode(vlm, prompts, images, chat_template, videos=videos)
