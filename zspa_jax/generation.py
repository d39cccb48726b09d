"""The host API of generation: `generate` and `generate_tokens` over the decode engine
(`zspa_jax.decode`: one jitted prefill, one `lax.while_loop` decode).

Two entry points share one implementation:
  * `generate(vlm, prompts, images, ...)` — strings + PIL images (or arrays) in, a
    `GenerateResult` with texts, token ids, kept indices and timings out;
  * `generate_tokens(vlm, input_ids, pixel_values, attention_mask, ...)` — pure JAX,
    usable inside a caller's `jax.jit`; returns a `GenerateOutput` pytree.
Shapes are static per (prompt bucket, cache bucket, keep); `max_new_tokens` is traced, so
changing it inside one cache bucket does not recompile.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from zspa_jax.batch import (
    device_arrays,
    encode,
    kept_per_row,
    prepare_arrays,
    resolve_prune,
    visual_args,
)
from zspa_jax.decode import (  # noqa: F401  (TRACE_COUNTS: the compile counter tests and benchmarks read)
    CACHE_BUCKET,
    TRACE_COUNTS,
    StaticSettings,
    decode_program,
    prefill_program,
    step_program,
)
from zspa_jax.families import family_of
from zspa_jax.host import HostBatch, prompt_bucket, round_up
from zspa_jax.loading import VLM, check_prune, check_vlm
from zspa_jax.pruning import PruneConfig
from zspa_jax.sampling import Sampling
from zspa_jax.sharding import fetch, mesh_context, place_key
from zspa_jax.validation import check_bool, check_int, check_rng, check_token_ids, is_traced

__all__ = ["GenerateOutput", "GenerateResult", "TRACE_COUNTS", "generate", "generate_tokens"]


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, T]
    lengths: jax.Array  # int32 [B]
    kept_indices: jax.Array | None  # int32 [B, K] or None


@dataclasses.dataclass
class GenerateResult:
    """What `generate` returns.

    `stats` keys; "_per_row" values are lists with one entry per batch row, "_total" and
    the timings cover the whole batch:
      batch_size; visual_tokens_per_image (N; the smallest image's when sizes differ),
      visual_tokens_kept_per_image (the method's K: per image under budget="image", per
      row otherwise), visual_tokens_per_row and visual_tokens_kept_per_row;
      prompt_tokens_per_row (real tokens, before pruning) and prompt_tokens_per_row_pruned;
      new_tokens_per_row (EOS included) and new_tokens_total; prefill_seconds and
      decode_seconds; decode_tokens_per_second_total (new_tokens_total / decode_seconds);
      kv_cache_bytes (the whole batch's cache); cache_length (cache slots per row).
    """

    texts: list[str] | None  # decoded answers (None without a tokenizer)
    sequences: np.ndarray  # int32 [B, n]: generated ids, pad after a row stops
    kept_indices: np.ndarray | None  # int32 [B, K] into the N visual tokens, ascending
    stats: dict[str, Any]


def _eos_ids(vlm: VLM, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return vlm.eos_token_ids
    return check_token_ids("eos_token_id", eos_token_id, vlm.config.text.vocab_size)


def cached_prompt_length(prune: PruneConfig | None, batch: HostBatch) -> int:
    """Cache slots the prefill fills per row: the (pruned) prompt, its N placeholders
    replaced by the kept tokens (inside the LLM, early layers cache the whole prompt)."""
    length = int(np.shape(batch.input_ids)[1])
    if prune is not None and not prune.record.llm_layer:
        length = length - batch.num_visual + kept_per_row(prune, batch)
    return length


def check_cache_room(cache_length: int, prompt_length: int, max_new_tokens: int) -> None:
    """A KV cache of `cache_length` slots must hold the prompt's `prompt_length` and
    `max_new_tokens` more: a shorter cache would end the answer early."""
    if prompt_length + max_new_tokens > cache_length:
        raise ValueError(
            f"the KV cache holds {cache_length} slots, but the prompt ({prompt_length} slots after pruning) "
            f"plus max_new_tokens ({max_new_tokens}) needs {prompt_length + max_new_tokens}"
        )


def _settings(
    vlm: VLM,
    batch: HostBatch,
    max_new_tokens_bound: int,
    *,
    prune,
    sampling,
    eos_token_id,
    keep_positions,
):
    check_bool("keep_positions", keep_positions)
    prune = resolve_prune(prune, batch)  # None without images: nothing to prune
    cache_length = round_up(cached_prompt_length(prune, batch) + max_new_tokens_bound, CACHE_BUCKET)
    # the host path's own count of what the prefill caches (zspa_jax.host), not the sizing's
    check_cache_room(cache_length, batch.llm_length, max_new_tokens_bound)
    return StaticSettings(
        sampling=sampling,
        prune=prune,
        cache_length=cache_length,
        eos_ids=_eos_ids(vlm, eos_token_id),
        pad_id=vlm.pad_token_id,
        special_ids=vlm.special_token_ids,
        keep_positions=bool(keep_positions),
    )


def _check_decode_room(state, st: StaticSettings, max_new_tokens: int) -> None:
    """The prefill's token buffer (what the cache has room for) must hold max_new_tokens:
    the decode loop stops at its end, so a short one is an error here, never a short answer."""
    room = int(state.tokens.shape[1])
    check_cache_room(st.cache_length, st.cache_length - room, max_new_tokens)


def _check_max_new_tokens(max_new_tokens) -> int:
    return check_int("max_new_tokens", max_new_tokens, minimum=1)


def generate_tokens(
    vlm: VLM,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int | jax.Array,
    max_new_tokens_bound: int | None = None,
    prune: PruneConfig | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    keep_positions: bool = False,
    **visual_arrays,
) -> GenerateOutput:
    """Array-in, array-out generation; traceable inside a caller's `jax.jit` (LLaVA; a
    Qwen2.5-VL batch needs concrete arrays, whose grid layouts are built on the host).

    input_ids: int [B, L], left-padded; pixel_values: the processor's pixel_values or
    None; attention_mask: [B, L]; **visual_arrays: the family's other visual arrays by the
    names its record declares (`Family.visual_args`, transformers' names; Qwen2.5-VL:
    image_grid_thw int [n, 3], and for videos pixel_values_videos, video_grid_thw int
    [v, 3], second_per_grid_ts [v]; LLaVA-NeXT: image_sizes int [n, 2]).
    `max_new_tokens` may be traced, in which case
    `max_new_tokens_bound` (a Python int) sizes the KV cache and bounds it. Returns
    tokens int32 [B, T] (T >= max_new_tokens; pad after a row stops), lengths int32 [B],
    kept_indices int32 [B, K] or None.
    """
    check_vlm(vlm)
    if max_new_tokens_bound is None:
        if is_traced(max_new_tokens):
            raise ValueError(
                "max_new_tokens is traced: pass max_new_tokens_bound (a Python int) to size the KV cache"
            )
        max_new_tokens_bound = max_new_tokens
    max_new_tokens_bound = _check_max_new_tokens(max_new_tokens_bound)
    if not is_traced(max_new_tokens):
        if int(_check_max_new_tokens(max_new_tokens)) > max_new_tokens_bound:
            raise ValueError(
                f"max_new_tokens ({int(max_new_tokens)}) exceeds max_new_tokens_bound ({max_new_tokens_bound})"
            )
    check_prune(prune)
    extras = visual_args(vlm, visual_arrays)
    batch = prepare_arrays(
        vlm,
        input_ids,
        pixel_values,
        attention_mask,
        extras,
        prune,
        extra_length=max_new_tokens_bound,
        bucket=True,
    )
    if rng is not None:
        check_rng("rng", rng)
    elif prune is not None and prune.record.needs_rng:
        raise ValueError(f"prune method {prune.method!r} needs rng (a jax.random key)")
    st = _settings(
        vlm,
        batch,
        max_new_tokens_bound,
        prune=prune,
        sampling=Sampling(temperature, top_k, top_p),
        eos_token_id=eos_token_id,
        keep_positions=keep_positions,
    )
    rng = jax.random.key(0) if rng is None else rng
    ids, mask, pixels, aux = device_arrays(batch, vlm.mesh)
    if not is_traced(rng):
        rng = place_key(rng, vlm.mesh)
    with mesh_context(vlm.mesh):
        s, kept = prefill_program(vlm.graphdef, vlm.state, ids, pixels, mask, aux, rng, st)
        _check_decode_room(s, st, max_new_tokens_bound)
        s = decode_program(vlm.graphdef, vlm.state, s, max_new_tokens, st)
    if batch.rows is not None:  # mesh padding dropped
        return GenerateOutput(
            s.tokens[: batch.rows],
            s.lengths[: batch.rows],
            None if kept is None else kept[: batch.rows],
        )
    return GenerateOutput(s.tokens, s.lengths, kept)


def generate(
    vlm: VLM,
    prompts: str | Sequence[str] | None = None,
    images: Any | Sequence[Any] | None = None,
    *,
    videos: Any | Sequence[Any] | None = None,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    prune: PruneConfig | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    keep_positions: bool = False,
    chat_template: bool | None = None,
    stream: bool = False,
    **visual_arrays,
) -> GenerateResult | Iterator[np.ndarray]:
    """Generate answers for prompts about images, optionally pruning visual tokens first.

    Give either `prompts` (+ `images`: one entry per prompt, a PIL image or a list of the
    prompt's images; + `videos` for families that take video (Qwen2.5-VL): one entry per
    prompt, None, a video — a list of PIL frames, an array [T, H, W, C] or a
    `zspa_jax.Video` with its frame rate and sampling — or a list of the prompt's videos) —
    encoded with the saved HF processor, chat template included when the model has one — or
    `input_ids` (+ `pixel_values`, `attention_mask`, and the family's other visual arrays
    as keyword arguments by the names its record declares (`Family.visual_args`), such as
    Qwen2.5-VL's `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
    `second_per_grid_ts`), with transformers' names.
    Prompts are left-padded to `prompt_bucket(length)` tokens (a pruned prompt to its
    pruned length's bucket); Qwen2.5-VL's tower windows and pruned image spans are padded
    to buckets too, so images of different sizes share compiled programs.

    Args:
      prune: a PruneConfig; None keeps all visual tokens.
      max_new_tokens: new tokens per row (EOS included); changing it inside one cache
        bucket does not recompile.
      temperature, top_k, top_p, seed: sampling (temperature 0 = greedy; top-p is applied
        within top-k).
      eos_token_id: int or list (an empty list never stops early); defaults to the model's.
      keep_positions: keep the original RoPE positions of kept tokens instead of
        renumbering them contiguously.
      stream: return an iterator that yields each step's new tokens (int32 [B]) as they
        are produced, reusing the same jitted decode step.
    """
    check_vlm(vlm)
    check_prune(prune)
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
    check_bool("stream", stream)
    extras = visual_args(vlm, visual_arrays)
    if (prompts is None) == (input_ids is None):
        raise ValueError("give exactly one of prompts (strings) or input_ids (arrays)")
    if prompts is not None:
        if pixel_values is not None or attention_mask is not None or extras:
            given = ", ".join(
                ["pixel_values"] * (pixel_values is not None)
                + ["attention_mask"] * (attention_mask is not None)
                + list(extras)
            )
            raise ValueError(f"{given} go with input_ids; with prompts, pass images (and videos)")
        encoded = encode(vlm, prompts, images, chat_template=chat_template, videos=videos)
        input_ids, pixel_values, attention_mask = (
            encoded.get(k) for k in ("input_ids", "pixel_values", "attention_mask")
        )
        extras = {k: v for k, v in encoded.items() if k in family_of(vlm).visual_args}
    else:
        if images is not None:
            raise ValueError("images go with prompts; with input_ids, pass pixel_values")
        if videos is not None:
            raise ValueError(
                "videos go with prompts; with input_ids, pass pixel_values_videos and video_grid_thw"
            )
        if chat_template is not None:
            raise ValueError(
                "chat_template applies to prompts (strings); input_ids are used as given"
            )
        if hasattr(input_ids, "shape") and len(input_ids.shape) == 1:  # one unbatched prompt
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
    host = prepare_arrays(
        vlm,
        input_ids,
        pixel_values,
        attention_mask,
        extras,
        prune,
        extra_length=max_new_tokens,
        bucket=True,
        prompt_bucket=prompt_bucket,
    )
    rows = slice(host.rows)  # what the caller passed; mesh padding is dropped from every result
    prompt_tokens = np.asarray(host.prompt_tokens, int)[rows]
    st = _settings(
        vlm,
        host,
        max_new_tokens,
        prune=prune,
        sampling=Sampling(temperature, top_k, top_p),
        eos_token_id=eos_token_id,
        keep_positions=keep_positions,
    )
    ids, mask, pixels, aux = device_arrays(host, vlm.mesh)
    rng = place_key(jax.random.key(seed), vlm.mesh)
    if stream:
        return _stream(vlm, ids, pixels, mask, aux, rng, max_new_tokens, st, rows)

    t0 = time.perf_counter()
    with mesh_context(vlm.mesh):
        s, kept = prefill_program(vlm.graphdef, vlm.state, ids, pixels, mask, aux, rng, st)
        _check_decode_room(s, st, max_new_tokens)
        jax.block_until_ready(s.logits)
        t1 = time.perf_counter()
        s = decode_program(vlm.graphdef, vlm.state, s, max_new_tokens, st)
        lengths = fetch(s.lengths)[rows]
    t2 = time.perf_counter()
    n = int(lengths.max()) if lengths.size else 0
    sequences = fetch(s.tokens)[rows, :n]
    n_visual = host.min_visual if pixels is not None else 0
    n_image = (host.min_image_visual or n_visual) if pixels is not None else 0
    kept_row = n_visual if st.prune is None else kept_per_row(st.prune, host)
    visual_per_row = (
        np.full(len(lengths), n_visual)
        if host.visual_per_row is None
        else np.asarray(host.visual_per_row)[rows]
    )
    stats = {
        "batch_size": int(len(lengths)),
        "visual_tokens_per_image": n_image,
        "visual_tokens_kept_per_image": n_image if st.prune is None else st.prune.keep,
        "visual_tokens_per_row": visual_per_row.astype(int).tolist(),
        "visual_tokens_kept_per_row": kept_row,
        "prompt_tokens_per_row": prompt_tokens.tolist(),
        "prompt_tokens_per_row_pruned": (
            prompt_tokens if st.prune is None else prompt_tokens - visual_per_row + kept_row
        )
        .astype(int)
        .tolist(),
        "new_tokens_per_row": lengths.astype(int).tolist(),
        "new_tokens_total": int(lengths.sum()),
        "prefill_seconds": t1 - t0,
        "decode_seconds": t2 - t1,
        "decode_tokens_per_second_total": float(lengths.sum() / (t2 - t1))
        if t2 > t1
        else float("nan"),
        "kv_cache_bytes": int(s.cache.nbytes),
        "cache_length": st.cache_length,
    }
    return GenerateResult(
        texts=_decode_texts(vlm, sequences, lengths, st.eos_ids),
        sequences=sequences,
        kept_indices=None if kept is None else fetch(kept)[rows],
        stats=stats,
    )


def _decode_texts(
    vlm: VLM, sequences: np.ndarray, lengths: np.ndarray, eos_ids
) -> list[str] | None:
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    if tokenizer is None:
        return None
    texts = []
    for row, n in zip(sequences, lengths):
        row = [int(t) for t in row[:n] if int(t) not in eos_ids]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def _stream(
    vlm, ids, pixels, mask, aux, rng, max_new_tokens, st, rows: slice
) -> Iterator[np.ndarray]:
    with mesh_context(vlm.mesh):
        s, _ = prefill_program(vlm.graphdef, vlm.state, ids, pixels, mask, aux, rng, st)
    _check_decode_room(s, st, max_new_tokens)
    for step in range(max_new_tokens):
        if fetch(s.done)[rows].all():
            return
        with mesh_context(vlm.mesh):
            s = step_program(vlm.graphdef, vlm.state, s, st)
        yield fetch(s.tokens[:, step])[rows]  # one column to the host, not the whole buffer
