"""A generation prefill computes the last layer for the last position only (`last_only`):
the same last hidden state and the same KV cache as the all-positions prefill, for fewer
FLOPs (the last layer's queries, attention output and MLP of every other position)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import LlamaConfig, LlamaModel
from tests.support.xla_cost import xla_flops
from zspa_jax.prefill import prefill, prefill_pruned_at_layer
from zspa_jax.pruning import PruneConfig

B, L, S, N_VISUAL = 2, 24, 32, 10  # S: cache slots (prompt + new tokens)


@pytest.fixture(scope="module")
def decoder() -> LlamaModel:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        qkv_bias=True,
        mrope_section=(2, 1, 1),
        max_position_embeddings=128,
    )
    return LlamaModel(cfg, rngs=nnx.Rngs(0))


def _inputs():
    rng = np.random.default_rng(0)
    embeds = jnp.asarray(rng.standard_normal((B, L, 32)), jnp.float32)
    mask = np.ones((B, L), np.int32)
    mask[1, :5] = 0  # a left-padded row
    positions = np.broadcast_to(np.maximum(np.cumsum(mask, axis=1) - 1, 0), (3, B, L)).copy()
    visual = np.broadcast_to(np.arange(6, 6 + N_VISUAL), (B, N_VISUAL)).astype(np.int32)
    text = (mask != 0) & ~np.isin(np.arange(L), visual[0])
    return embeds, jnp.asarray(positions), jnp.asarray(mask), jnp.asarray(visual), jnp.asarray(text)


def _run(decoder, strategy, last_only):
    embeds, positions, mask, visual, text = _inputs()
    graphdef, state = nnx.split(decoder)

    def program(state, embeds, positions, mask):
        model = nnx.merge(graphdef, state)
        if strategy == "all layers":
            return prefill(model, embeds, positions, mask, S, last_only=last_only)
        record = PruneConfig(method="fastv", keep=4, layer=1).record
        return prefill_pruned_at_layer(
            model,
            embeds,
            positions,
            mask,
            method=record,
            layer=1,
            keep=4,
            visual_index=visual,
            visual_valid=None,
            text_mask=text,
            cache_length=S,
            last_only=last_only,
        )

    args = (state, embeds, positions, mask)
    return jax.jit(program)(*args), xla_flops(program, *args)


@pytest.mark.parametrize("strategy", ["all layers", "pruned at layer 1"])
def test_last_only_gives_the_last_hidden_state_and_cache_for_fewer_flops(decoder, strategy):
    (full, full_flops), (last, last_flops) = (
        _run(decoder, strategy, flag) for flag in (False, True)
    )
    assert full.hidden.shape[1] > 1 and last.hidden.shape == (B, 1, 32)
    np.testing.assert_allclose(
        np.asarray(last.hidden[:, 0]), np.asarray(full.hidden[:, -1]), rtol=0, atol=1e-6
    )
    for a, b in zip(full.cache.k + full.cache.v, last.cache.k + last.cache.v):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b)
        )  # keys and values of every position
    np.testing.assert_array_equal(np.asarray(full.mask), np.asarray(last.mask))
    np.testing.assert_array_equal(np.asarray(full.prompt_lengths), np.asarray(last.prompt_lengths))
    # At least the last layer's MLP (3 matmuls of 32 x 80) of every position but one is skipped.
    rows = full.hidden.shape[1] - 1
    assert full_flops - last_flops >= B * rows * 3 * 2 * 32 * 80, (full_flops, last_flops)
