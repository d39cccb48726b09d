"""The attention kernels against models.layers.dot_product_attention: models.llama.
decode_attention (one query over a KV cache, the decode step's attention) and models.layers.
causal_prompt_attention (a prompt over its own keys by query blocks, the prefill's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import causal_prompt_attention, dot_product_attention, padding_causal_mask
from models.llama import decode_attention


@pytest.mark.parametrize(
    "heads,kv_heads", [(4, 4), (9, 3), (8, 1)]
)  # MHA, GQA (SmolLM2's 9/3), MQA
def test_decode_attention_equals_dot_product_attention(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, s, dh = 3, 40, 16
    q = rng.standard_normal((b, 1, heads, dh)).astype(np.float32)
    k = rng.standard_normal((b, s, kv_heads, dh)).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads, dh)).astype(np.float32)
    mask = np.zeros((b, 1, s), bool)
    for row, (start, stop) in enumerate(
        [(0, 40), (7, 23), (30, 31)]
    ):  # left padding, unused tail, one slot
        mask[row, 0, start:stop] = True
    k[~mask[:, 0]] = 1e4  # masked slots may hold anything finite: they must not count
    got = np.asarray(
        decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    )
    want = np.asarray(
        dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    )
    assert got.shape == want.shape == (b, 1, heads, dh)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(
        got[2], np.broadcast_to(v[2, 30].repeat(heads // kv_heads, 0), (1, heads, dh))
    )


def test_decode_attention_keeps_the_query_dtype():
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        for shape in [(1, 1, 4, 8), (1, 6, 2, 8), (1, 6, 2, 8)]
    )
    mask = jnp.ones((1, 1, 6), bool)
    got = decode_attention(q, k, v, mask)
    want = dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask
    )
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0, atol=2e-2)


@pytest.mark.parametrize(
    "length,block", [(37, 8), (5, 8)]
)  # several blocks, the last ragged; one block
def test_causal_prompt_attention_equals_dot_product_attention_on_rows_that_see_a_key(length, block):
    rng = np.random.default_rng(length)
    b, heads, kv_heads, dh = 2, 6, 2, 8
    q = jnp.asarray(rng.standard_normal((b, length, heads, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, length, kv_heads, dh)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, length, kv_heads, dh)), jnp.float32)
    attention_mask = np.ones((b, length), np.int32)
    attention_mask[1, : length // 2] = 0  # left padding: those query rows see no key
    mask = padding_causal_mask(jnp.asarray(attention_mask))
    got = np.asarray(
        jax.jit(causal_prompt_attention, static_argnames="block")(q, k, v, mask, block=block)
    )
    want = np.asarray(jax.jit(dot_product_attention)(q, k, v, mask))
    real = attention_mask.astype(bool)
    assert got.shape == want.shape == (b, length, heads, dh)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-6)
