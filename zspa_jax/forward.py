"""`forward(vlm, input_ids, pixel_values, attention_mask=None, prune=None, *, image_grid_thw=None, ...) -> logits`.

The visual arrays besides pixel_values are keyword arguments by the names the family's
record declares (`Family.visual_args`, transformers' names)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from zspa_jax.batch import device_arrays, prepare_arrays, resolve_prune, visual_args
from zspa_jax.loading import VLM, check_prune, check_vlm
from zspa_jax.pipeline import decoder_inputs
from zspa_jax.prefill import run_prefill
from zspa_jax.pruning import PruneConfig
from zspa_jax.sharding import fetch, mesh_context, place_key
from zspa_jax.validation import check_bool, check_int


@functools.partial(jax.jit, static_argnames=("graphdef", "prune", "special_ids", "keep_positions"))
def _forward(
    graphdef,
    params,
    input_ids,
    pixel_values,
    attention_mask,
    aux,
    rng,
    prune,
    special_ids,
    keep_positions,
):
    model = nnx.merge(graphdef, params)
    inputs = decoder_inputs(
        model, input_ids, pixel_values, attention_mask, prune, special_ids, rng, keep_positions, aux
    )
    out = run_prefill(model.language_model.model, inputs, prune)
    kept = inputs.kept_indices if out.kept is None else out.kept
    return model.language_model.logits(out.hidden), kept, out.mask


def forward(
    vlm: VLM,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    prune: PruneConfig | None = None,
    *,
    seed: int = 0,
    keep_positions: bool = False,
    return_kept: bool = False,
    return_mask: bool = False,
    **visual_arrays,
):
    """Logits over the whole (possibly pruned) sequence, for parity checks and scoring.

    Args:
      input_ids: int [B, L], left-padded, with the image placeholders the processor wrote
        (LLaVA: `tokens_per_image` per image; Qwen2.5-VL: t*h*w / merge^2 per image).
      pixel_values: the processor's pixel_values (LLaVA float [M, C, H, W]; Qwen2.5-VL the
        flattened patches [sum t*h*w, C*T*p*p]), images in reading order, or None.
      attention_mask: [B, L], 0 on left padding.
      prune: a PruneConfig (one or several images per row; `budget` says whether K is per
        row or per image); the kept tokens replace the placeholders (methods inside the
        LLM: from layer `prune.options["layer"]` on; earlier layers see all tokens).
      **visual_arrays: the family's other visual arrays by the names its record declares
        (`Family.visual_args`, transformers' names; Qwen2.5-VL: image_grid_thw int
        [num_images, 3], ...; LLaVA-NeXT: image_sizes int [num_images, 2]); one the family
        does not take is a ValueError, a name no family takes a TypeError.
      seed: rng seed for method="random".
      return_kept: also return the kept indices int32 [B, K] into each row's visual tokens
        in reading order (None without pruning).
      return_mask: also return the attention mask of the returned positions (when pruning,
        a row with fewer visual tokens than the largest carries masked slots: those are 0).
    Returns:
      f32 numpy [B, L', vocab] with L' = L - N + K when pruning (else L).
    """
    check_vlm(vlm)
    check_prune(prune)
    extras = visual_args(vlm, visual_arrays)
    seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
    for name, value in (
        ("keep_positions", keep_positions),
        ("return_kept", return_kept),
        ("return_mask", return_mask),
    ):
        check_bool(name, value)
    batch = prepare_arrays(vlm, input_ids, pixel_values, attention_mask, extras, prune)
    prune = resolve_prune(prune, batch)
    ids, mask, pixels, aux = device_arrays(batch, vlm.mesh)
    with mesh_context(vlm.mesh):
        logits, kept, out_mask = _forward(
            vlm.graphdef,
            vlm.state,
            ids,
            pixels,
            mask,
            aux,
            place_key(jax.random.key(seed), vlm.mesh),
            prune,
            vlm.special_token_ids,
            bool(keep_positions),
        )
    rows = slice(batch.rows)  # mesh padding dropped
    out = [fetch(logits)[rows]]
    if return_kept:
        out.append(None if kept is None else fetch(kept)[rows])
    if return_mask:
        out.append(fetch(out_mask)[rows])
    return out[0] if len(out) == 1 else tuple(out)
