"""The decode engine: one jitted prefill program and one jitted decode program.

`prefill_program` runs the (pruned) prompt through the decoder and fills the KV cache
(zspa_jax.pipeline + zspa_jax.prefill); `decode_program` samples up to `max_new_tokens`
(traced) in one `lax.while_loop` over `DecodeState`; `step_program` is one step of it
(streaming). Every program is a plain `jax.jit` over the model's `nnx.split` state (graphdef
static): cheaper per call than `nnx.jit`. Shapes are static per (prompt bucket, cache
bucket, keep); `StaticSettings` is everything else that fixes a compiled program. The
engine knows no model family and no pruning method: it reads the method record only
through the prefill strategy, and the decode state knows only each layer's cache length.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama import KVCache
from zspa_jax.pipeline import decoder_inputs
from zspa_jax.prefill import run_prefill
from zspa_jax.pruning import PruneConfig
from zspa_jax.sampling import Sampling
from zspa_jax.sharding import constrain_cache

__all__ = [
    "CACHE_BUCKET",
    "DecodeState",
    "StaticSettings",
    "TRACE_COUNTS",
    "decode_program",
    "prefill_program",
    "step_program",
]

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


def _prefill(model, input_ids, pixel_values, attention_mask, aux, rng, st: StaticSettings):
    """Run the (pruned) prompt through the decoder, filling each layer's cache slots."""
    rng, prune_rng = jax.random.split(rng)
    inputs = decoder_inputs(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        st.prune,
        st.special_ids,
        prune_rng,
        st.keep_positions,
        aux,
    )
    lm = model.language_model
    out = run_prefill(
        lm.model, inputs, st.prune, st.cache_length, last_only=True
    )  # only the last position's logits
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
    if st.sampling.greedy:  # argmax reads no key: no split (a small loop of its own each step)
        rng, sample_rng = s.rng, None
    else:
        rng, sample_rng = jax.random.split(s.rng)
    token = jnp.where(s.done, st.pad_id, st.sampling(s.logits, sample_rng))
    tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
    lengths = s.lengths + (~s.done).astype(jnp.int32)
    done = s.done | jnp.isin(token, jnp.asarray(st.eos_ids or (-1,), jnp.int32))
    slots = s.prompt_lengths + s.step  # [layers]
    kv_valid = tuple(
        v | (jnp.arange(v.shape[1])[None, :] == slots[i]) for i, v in enumerate(s.kv_valid)
    )
    lm = model.language_model
    hidden, cache = lm.model(
        lm.embed(token[:, None]),
        s.next_position[:, None],
        tuple(v[:, None, :] for v in kv_valid),
        s.cache,
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
    # The host refuses a buffer shorter than max_new_tokens (its bound when traced) before
    # calling this (generation.check_cache_room), so the clamp never shortens an answer; it
    # keeps a traced max_new_tokens above its documented bound inside the cache.
    limit = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), s.tokens.shape[1])
    cond = lambda s: (s.step < limit) & ~jnp.all(s.done)
    return jax.lax.while_loop(cond, lambda s: _decode_step(model, s, st), s)


def _jit_prefill(graphdef, params, input_ids, pixel_values, attention_mask, aux, rng, st):
    TRACE_COUNTS["prefill"] += 1
    return _prefill(
        nnx.merge(graphdef, params), input_ids, pixel_values, attention_mask, aux, rng, st
    )


def _jit_decode(graphdef, params, s, max_new_tokens, st):
    TRACE_COUNTS["decode"] += 1
    return _decode_loop(nnx.merge(graphdef, params), s, max_new_tokens, st)


def _jit_step(graphdef, params, s, st):
    TRACE_COUNTS["step"] += 1
    return _decode_step(nnx.merge(graphdef, params), s, st)


prefill_program = jax.jit(_jit_prefill, static_argnames=("graphdef", "st"))
decode_program = jax.jit(_jit_decode, static_argnames=("graphdef", "st"), donate_argnames=("s",))
step_program = jax.jit(_jit_step, static_argnames=("graphdef", "st"), donate_argnames=("s",))
