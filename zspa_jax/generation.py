"""`generate`: pruned prefill + KV-cache decoding in one `lax.while_loop`.

Two entry points share one implementation:
  * `generate(vlm, prompts, images, ...)` — strings + PIL images (or arrays) in, a
    `GenerateResult` with texts, token ids, kept indices and timings out;
  * `generate_tokens(vlm, input_ids, pixel_values, attention_mask, ...)` — pure JAX,
    usable inside a caller's `jax.jit`; returns a `GenerateOutput` pytree.
Shapes are static per (prompt bucket, cache bucket, keep); `max_new_tokens` is traced, so
changing it inside one cache bucket does not recompile.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import KVCache
from zspa_jax.batch import device_arrays, encode, prepare_arrays, reject_video, resolve_prune
from zspa_jax.families import HostBatch
from zspa_jax.families.base import PROMPT_BUCKET, round_up
from zspa_jax.loading import VLM, check_prune, check_vlm
from zspa_jax.pipeline import decoder_inputs
from zspa_jax.prefill import run_prefill
from zspa_jax.pruning import PruneConfig
from zspa_jax.sampling import Sampling
from zspa_jax.sharding import constrain_cache, fetch, mesh_context, place_key
from zspa_jax.validation import check_bool, check_int, check_rng, check_token_ids, is_traced

CACHE_BUCKET = 64  # the KV cache holds a multiple of this many tokens

# Incremented at trace time: a compile counter for tests and benchmarks.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """Everything that fixes the compiled program (a jit static argument)."""

    sampling: Sampling
    prune: PruneConfig | None
    cache_length: int
    eos_ids: tuple[int, ...]
    pad_id: int
    special_ids: tuple[int, ...]
    keep_positions: bool = False


class DecodeState(NamedTuple):
    step: jax.Array  # int32 scalar: tokens generated so far
    tokens: jax.Array  # int32 [B, T]: generated ids, pad after a row stops
    lengths: jax.Array  # int32 [B]
    done: jax.Array  # bool [B]
    logits: jax.Array  # f32 [B, V]: next-token logits
    cache: KVCache  # per layer [B, S_i, Hkv, Dh]: layers may hold different lengths
    kv_valid: tuple[jax.Array, ...]  # per layer bool [B, S_i]: slots that hold a real token
    prompt_lengths: jax.Array  # int32 [layers]: each layer's cache slot of step 0
    next_position: jax.Array  # int32 [B]: RoPE position of the next token (same on all M-RoPE rows)
    rng: jax.Array


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
      visual_tokens_kept_per_image (K) and visual_tokens_per_row;
      prompt_tokens_per_row (real tokens, before pruning) and prompt_tokens_per_row_pruned;
      new_tokens_per_row (EOS included) and new_tokens_total; prefill_seconds and
      decode_seconds; decode_tokens_per_second_total (new_tokens_total / decode_seconds);
      kv_cache_bytes (the whole batch's cache); cache_length (cache slots per row).
    """

    texts: list[str] | None  # decoded answers (None without a tokenizer)
    sequences: np.ndarray  # int32 [B, n]: generated ids, pad after a row stops
    kept_indices: np.ndarray | None  # int32 [B, K] into the N visual tokens, ascending
    stats: dict[str, Any]


def _prefill(model, input_ids, pixel_values, attention_mask, aux, rng, st: StaticSettings):
    """Run the (pruned) prompt through the decoder, filling each layer's cache slots."""
    rng, prune_rng = jax.random.split(rng)
    inputs = decoder_inputs(
        model, input_ids, pixel_values, attention_mask, st.prune, st.special_ids, prune_rng, st.keep_positions, aux
    )
    lm = model.language_model
    out = run_prefill(lm.model, inputs, st.prune, st.cache_length)
    b, length = inputs.mask.shape
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((b, st.cache_length - length), st.pad_id, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        logits=lm.logits(out.hidden[:, -1]),  # left padding: the last position is real in every row
        cache=constrain_cache(out.cache),
        kv_valid=out.kv_valid,
        prompt_lengths=out.prompt_lengths,
        next_position=inputs.next_position,
        rng=rng,
    )
    return state, inputs.kept_indices if out.kept is None else out.kept


def _decode_step(model, s: DecodeState, st: StaticSettings) -> DecodeState:
    """Sample one token per row, append it to every layer's cache, compute the next logits."""
    rng, sample_rng = jax.random.split(s.rng)
    token = jnp.where(s.done, st.pad_id, st.sampling(s.logits, sample_rng))
    tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
    lengths = s.lengths + (~s.done).astype(jnp.int32)
    done = s.done | jnp.isin(token, jnp.asarray(st.eos_ids or (-1,), jnp.int32))
    slots = s.prompt_lengths + s.step  # [layers]
    kv_valid = tuple(v | (jnp.arange(v.shape[1])[None, :] == slots[i]) for i, v in enumerate(s.kv_valid))
    lm = model.language_model
    hidden, cache = lm.model(
        lm.embed(token[:, None]), s.next_position[:, None], tuple(v[:, None, :] for v in kv_valid), s.cache,
        tuple(slots[i] for i in range(len(kv_valid))),
    )
    return s._replace(
        step=s.step + 1,
        tokens=tokens,
        lengths=lengths,
        done=done,
        logits=lm.logits(hidden[:, 0]),
        cache=constrain_cache(cache),
        kv_valid=kv_valid,
        next_position=s.next_position + 1,
        rng=rng,
    )


def _decode_loop(model, s: DecodeState, max_new_tokens, st: StaticSettings) -> DecodeState:
    limit = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), s.tokens.shape[1])
    cond = lambda s: (s.step < limit) & ~jnp.all(s.done)
    return jax.lax.while_loop(cond, lambda s: _decode_step(model, s, st), s)


# --- jitted programs over (graphdef, state): plain jax.jit is cheaper per call than nnx.jit.
def _jit_prefill(graphdef, params, input_ids, pixel_values, attention_mask, aux, rng, st):
    TRACE_COUNTS["prefill"] += 1
    return _prefill(nnx.merge(graphdef, params), input_ids, pixel_values, attention_mask, aux, rng, st)


def _jit_decode(graphdef, params, s, max_new_tokens, st):
    TRACE_COUNTS["decode"] += 1
    return _decode_loop(nnx.merge(graphdef, params), s, max_new_tokens, st)


def _jit_step(graphdef, params, s, st):
    TRACE_COUNTS["step"] += 1
    return _decode_step(nnx.merge(graphdef, params), s, st)


_prefill_fn = jax.jit(_jit_prefill, static_argnames=("graphdef", "st"))
_decode_fn = jax.jit(_jit_decode, static_argnames=("graphdef", "st"), donate_argnames=("s",))
_step_fn = jax.jit(_jit_step, static_argnames=("graphdef", "st"), donate_argnames=("s",))


def _eos_ids(vlm: VLM, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return vlm.eos_token_ids
    return check_token_ids("eos_token_id", eos_token_id, vlm.config.text.vocab_size)


def _settings(
    vlm: VLM, batch: HostBatch, max_new_tokens_bound: int, *, prune, sampling, eos_token_id, keep_positions
):
    check_bool("keep_positions", keep_positions)
    prune = resolve_prune(prune, batch)  # None without images: nothing to prune
    prompt_length = int(np.shape(batch.input_ids)[1])
    if prune is not None and not prune.record.llm_layer:  # inside the LLM, early layers cache the whole prompt
        prompt_length = prompt_length - batch.num_visual + prune.num_keep(batch.num_visual)
    return StaticSettings(
        sampling=sampling,
        prune=prune,
        cache_length=round_up(prompt_length + max_new_tokens_bound, CACHE_BUCKET),
        eos_ids=_eos_ids(vlm, eos_token_id),
        pad_id=vlm.pad_token_id,
        special_ids=vlm.special_token_ids,
        keep_positions=bool(keep_positions),
    )


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
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
) -> GenerateOutput:
    """Array-in, array-out generation; traceable inside a caller's `jax.jit` (LLaVA; a
    Qwen2.5-VL batch needs concrete arrays, whose grid layouts are built on the host).

    input_ids: int [B, L], left-padded; pixel_values: the processor's pixel_values or
    None; attention_mask: [B, L]; image_grid_thw: int [n, 3] with Qwen2.5-VL images
    (video arguments are refused). `max_new_tokens` may be traced, in which case
    `max_new_tokens_bound` (a Python int) sizes the KV cache and bounds it. Returns
    tokens int32 [B, T] (T >= max_new_tokens; pad after a row stops), lengths int32 [B],
    kept_indices int32 [B, K] or None.
    """
    check_vlm(vlm)
    if max_new_tokens_bound is None:
        if is_traced(max_new_tokens):
            raise ValueError("max_new_tokens is traced: pass max_new_tokens_bound (a Python int) to size the KV cache")
        max_new_tokens_bound = max_new_tokens
    max_new_tokens_bound = _check_max_new_tokens(max_new_tokens_bound)
    if not is_traced(max_new_tokens):
        if int(_check_max_new_tokens(max_new_tokens)) > max_new_tokens_bound:
            raise ValueError(
                f"max_new_tokens ({int(max_new_tokens)}) exceeds max_new_tokens_bound ({max_new_tokens_bound})"
            )
    check_prune(prune)
    reject_video(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    batch = prepare_arrays(
        vlm, input_ids, pixel_values, attention_mask, image_grid_thw, prune, extra_length=max_new_tokens_bound,
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
        s, kept = _prefill_fn(vlm.graphdef, vlm.state, ids, pixels, mask, aux, rng, st)
        s = _decode_fn(vlm.graphdef, vlm.state, s, max_new_tokens, st)
    if batch.rows is not None:  # mesh padding dropped
        return GenerateOutput(s.tokens[: batch.rows], s.lengths[: batch.rows], None if kept is None else kept[: batch.rows])
    return GenerateOutput(s.tokens, s.lengths, kept)


def generate(
    vlm: VLM,
    prompts: str | Sequence[str] | None = None,
    images: Any | Sequence[Any] | None = None,
    *,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
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
) -> GenerateResult | Iterator[np.ndarray]:
    """Generate answers for prompts about images, optionally pruning visual tokens first.

    Give either `prompts` (+ `images`, PIL, one per prompt) — encoded with the saved HF
    processor, chat template included when the model has one — or `input_ids`
    (+ `pixel_values`, `attention_mask`, and `image_grid_thw` for Qwen2.5-VL) arrays, with
    transformers' names. Prompts are left-padded to a multiple of PROMPT_BUCKET tokens;
    Qwen2.5-VL's tower windows and pruned image spans are padded to buckets too, so images
    of different sizes share compiled programs. Video input is refused.

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
    reject_video(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    if (prompts is None) == (input_ids is None):
        raise ValueError("give exactly one of prompts (strings) or input_ids (arrays)")
    if prompts is not None:
        if pixel_values is not None or attention_mask is not None or image_grid_thw is not None:
            raise ValueError("pixel_values/attention_mask/image_grid_thw go with input_ids; with prompts, pass images")
        encoded = encode(vlm, prompts, images, chat_template=chat_template)
        input_ids, pixel_values, attention_mask, image_grid_thw = (
            encoded.get(k) for k in ("input_ids", "pixel_values", "attention_mask", "image_grid_thw")
        )
    else:
        if images is not None:
            raise ValueError("images go with prompts; with input_ids, pass pixel_values")
        if chat_template is not None:
            raise ValueError("chat_template applies to prompts (strings); input_ids are used as given")
        if hasattr(input_ids, "shape") and len(input_ids.shape) == 1:  # one unbatched prompt
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
    host = prepare_arrays(
        vlm,
        input_ids,
        pixel_values,
        attention_mask,
        image_grid_thw,
        prune,
        extra_length=max_new_tokens,
        bucket=True,
        prompt_bucket=PROMPT_BUCKET,
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
        s, kept = _prefill_fn(vlm.graphdef, vlm.state, ids, pixels, mask, aux, rng, st)
        jax.block_until_ready(s.logits)
        t1 = time.perf_counter()
        s = _decode_fn(vlm.graphdef, vlm.state, s, max_new_tokens, st)
        lengths = fetch(s.lengths)[rows]
    t2 = time.perf_counter()
    n = int(lengths.max()) if lengths.size else 0
    sequences = fetch(s.tokens)[rows, :n]
    n_visual = host.min_visual if pixels is not None else 0  # per image (the smallest when sizes differ)
    kept_count = n_visual if st.prune is None else st.prune.num_keep(n_visual)
    visual_per_row = (
        np.full(len(lengths), n_visual) if host.visual_per_row is None else np.asarray(host.visual_per_row)[rows]
    )
    stats = {
        "batch_size": int(len(lengths)),
        "visual_tokens_per_image": n_visual,
        "visual_tokens_kept_per_image": kept_count,
        "visual_tokens_per_row": visual_per_row.astype(int).tolist(),
        "prompt_tokens_per_row": prompt_tokens.tolist(),
        "prompt_tokens_per_row_pruned": (
            prompt_tokens if st.prune is None else prompt_tokens - visual_per_row + kept_count
        ).astype(int).tolist(),
        "new_tokens_per_row": lengths.astype(int).tolist(),
        "new_tokens_total": int(lengths.sum()),
        "prefill_seconds": t1 - t0,
        "decode_seconds": t2 - t1,
        "decode_tokens_per_second_total": float(lengths.sum() / (t2 - t1)) if t2 > t1 else float("nan"),
        "kv_cache_bytes": int(s.cache.nbytes),
        "cache_length": st.cache_length,
    }
    return GenerateResult(
        texts=_decode_texts(vlm, sequences, lengths, st.eos_ids),
        sequences=sequences,
        kept_indices=None if kept is None else fetch(kept)[rows],
        stats=stats,
    )


def _decode_texts(vlm: VLM, sequences: np.ndarray, lengths: np.ndarray, eos_ids) -> list[str] | None:
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    if tokenizer is None:
        return None
    texts = []
    for row, n in zip(sequences, lengths):
        row = [int(t) for t in row[:n] if int(t) not in eos_ids]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def _stream(vlm, ids, pixels, mask, aux, rng, max_new_tokens, st, rows: slice) -> Iterator[np.ndarray]:
    with mesh_context(vlm.mesh):
        s, _ = _prefill_fn(vlm.graphdef, vlm.state, ids, pixels, mask, aux, rng, st)
    for step in range(max_new_tokens):
        if fetch(s.done)[rows].all():
            return
        with mesh_context(vlm.mesh):
            s = _step_fn(vlm.graphdef, vlm.state, s, st)
        yield fetch(s.tokens[:, step])[rows]  # one column to the host, not the whole buffer
