"""zspa_jax.estimate against XLA's own FLOP count, KVCache sizes and parameter counts.

XLA counts every floating-point op of the compiled program (`cost_analysis()["flops"]`,
a multiply-add = 2); the estimator counts only matrix products. At these widths
(d = 256, dh = 64, n >= 96) the element-wise work it leaves out (norms, softmax, RoPE,
activations, residual adds, biases) is ~1% of the total, so XLA must come out between
1x and 1.05x the estimate. Shapes are abstract (`nnx.eval_shape` + ShapeDtypeStruct):
nothing is allocated or run, only compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.checkpoint import flatten, param_template
from models.clip import CLIPVisionConfig
from models.layers import padding_causal_mask
from models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from models.llava import LlavaConfig, LlavaForConditionalGeneration
from zspa_jax import estimate as est

# Element-wise ops XLA counts and the estimator does not: ~1% here (measured 0.8-1.4%).
LOW, HIGH = 0.995, 1.05

TEXT = LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
VISION = CLIPVisionConfig(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4, image_size=128, patch_size=8
)
LLAVA = LlavaConfig(vision=VISION, text=TEXT, image_token_index=511)  # 256 visual tokens


def xla_flops(fn, *args) -> float:
    """XLA's FLOP count of jit(fn) compiled for these (abstract) arguments."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


@pytest.fixture(scope="module")
def decoder():
    return nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(TEXT, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def llava():
    return nnx.split(nnx.eval_shape(lambda: LlavaForConditionalGeneration(LLAVA, rngs=nnx.Rngs(0))))


def _prefill_flops_xla(decoder, n: int, cache_length: int | None = None) -> float:
    """Decoder on n tokens + LM head on the last position, optionally into a KV cache."""
    graphdef, state = decoder

    def prefill(state, embeds):
        lm = nnx.merge(graphdef, state)
        positions = jnp.arange(n)[None]
        if cache_length is None:
            hidden, _ = lm.model(embeds, positions, padding_causal_mask(jnp.ones((1, n), jnp.int32)))
        else:
            mask = jnp.arange(cache_length)[None, None, :] <= jnp.arange(n)[None, :, None]
            hidden, _ = lm.model(embeds, positions, mask, KVCache.zeros(TEXT, 1, cache_length), 0)
        return lm.logits(hidden[:, -1])

    return xla_flops(prefill, state, jax.ShapeDtypeStruct((1, n, TEXT.hidden_size), jnp.float32))


def test_mha_layer_reduces_to_the_textbook_formula():
    n, d, m = 100, 512, 1376
    mha = LlamaConfig(hidden_size=d, intermediate_size=m, num_attention_heads=8, num_key_value_heads=8)
    assert est.decoder_layer_macs(mha, n) == 4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m


def test_decoder_prefill_flops_match_xla(decoder):
    n = 256
    xla = _prefill_flops_xla(decoder, n)
    ours = est.llm_prefill_flops(TEXT, n)
    assert LOW <= xla / ours <= HIGH, (xla, ours, xla / ours)


def test_decoder_prefill_into_a_cache_matches_xla(decoder):
    # zspa_jax's prefill attends over the whole preallocated cache: kv_len = cache length.
    n, cache_length = 256, 384
    xla = _prefill_flops_xla(decoder, n, cache_length)
    ours = est.llm_prefill_flops(TEXT, n, kv_len=cache_length)
    assert LOW <= xla / ours <= HIGH, (xla, ours, xla / ours)


def test_vision_tower_and_projector_flops_match_xla(llava):
    graphdef, state = llava
    pixels = jax.ShapeDtypeStruct((1, 3, VISION.image_size, VISION.image_size), jnp.float32)
    tower = xla_flops(lambda s, p: nnx.merge(graphdef, s).selected_vision_features(p), state, pixels)
    assert LOW <= tower / est.vision_flops(LLAVA) <= HIGH, (tower, est.vision_flops(LLAVA))
    both = xla_flops(lambda s, p: nnx.merge(graphdef, s).image_features(p), state, pixels)
    ours = est.vision_flops(LLAVA) + est.projector_flops(LLAVA)
    assert LOW <= both / ours <= HIGH, (both, ours)
    # Feature layer -2: the last encoder layer never runs.
    assert est.estimate(LLAVA, 10)["vision_layers_run"] == VISION.num_hidden_layers - 1


@pytest.mark.parametrize("dtype, kv_dtype_bytes", [("float32", None), ("float32", 2), ("bfloat16", None)])
def test_kv_bytes_equal_kvcache_nbytes(dtype, kv_dtype_bytes):
    text = LlamaConfig(**{**TEXT.__dict__, "dtype": dtype})
    cfg = LlavaConfig(vision=VISION, text=text, image_token_index=511)
    text_tokens, keep, new_tokens, batch = 37, 64, 11, 3
    e = est.estimate(cfg, text_tokens, keep=keep, new_tokens=new_tokens, batch=batch, kv_dtype_bytes=kv_dtype_bytes)
    kv_dtype = {None: None, 2: jnp.bfloat16}[kv_dtype_bytes]
    cache = KVCache.zeros(text, batch, text_tokens + keep + new_tokens, dtype=kv_dtype)
    assert e["kv_cache_bytes"] == cache.nbytes
    full = KVCache.zeros(text, batch, text_tokens + cfg.image_seq_length + new_tokens, dtype=kv_dtype)
    assert e["kv_cache_bytes_unpruned"] == full.nbytes


def test_weight_bytes_equal_the_parameter_tree():
    # (LLaVA-1.5-7B's count is checked by number below: its abstract tree takes ~10 s to build.)
    tied = LlamaConfig(**{**TEXT.__dict__, "tie_word_embeddings": True, "attention_bias": True, "dtype": "bfloat16"})
    for cfg in (LLAVA, LlavaConfig(vision=VISION, text=tied, image_token_index=511, vision_feature_layer=(-2, -3))):
        flat = flatten(param_template(cfg))
        total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in flat.values())
        assert est.estimate(cfg, 10)["weight_bytes"] == total


def test_pruning_reduces_prefill_flops_by_the_expected_amount(decoder):
    text_tokens, keep = 32, 64
    n = LLAVA.image_seq_length
    e = est.estimate(LLAVA, text_tokens, keep=keep)
    assert e["sequence_length"] == text_tokens + keep and e["sequence_length_unpruned"] == text_tokens + n
    assert e["llm_prefill_flops"] == est.llm_prefill_flops(TEXT, text_tokens + keep)
    assert e["llm_prefill_flops_unpruned"] == est.estimate(LLAVA, text_tokens)["llm_prefill_flops"]
    # The saving is what XLA sees between the two prefill programs.
    full = _prefill_flops_xla(decoder, text_tokens + n)
    pruned = _prefill_flops_xla(decoder, text_tokens + keep)
    assert full / pruned == pytest.approx(e["prefill_reduction"], rel=0.01)
    saved = e["llm_prefill_flops_unpruned"] - e["llm_prefill_flops"]
    assert LOW <= (full - pruned) / saved <= HIGH
    # Vision, projector and decoder weights do not depend on keep; the pruning cost is small.
    assert e["vision_flops"] == est.estimate(LLAVA, text_tokens)["vision_flops"]
    assert 0 < e["pruning_flops"] < 0.02 * saved


def test_llava_1_5_7b_numbers():
    cfg = est.llava_1_5_7b_config()
    assert cfg.image_seq_length == 576 and cfg.vision.num_patches + 1 == 577
    e = est.estimate(cfg, 60, keep=64, kv_dtype_bytes=2)
    # LLaMA-2-7B: 512 KiB of f16 K+V per token; 6.74e9 parameters (vocab 32064 adds 2 x 64 rows).
    assert e["kv_cache_bytes_per_token"] == 2 * 32 * 4096 * 2
    assert e["kv_cache_bytes"] == 124 * 2 * 32 * 4096 * 2
    assert e["weight_bytes_llm"] // 2 == 6_738_415_616 + 2 * 64 * 4096
    # Pruning itself costs under 0.1% of the prefill work it removes.
    assert e["pruning_flops"] < 1e-3 * (e["llm_prefill_flops_unpruned"] - e["llm_prefill_flops"])
    assert e["prefill_reduction"] > 5.0
    with pytest.raises(ValueError, match="keep"):
        est.estimate(cfg, 60, keep=577)
