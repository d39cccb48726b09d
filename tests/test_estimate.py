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

from models.checkpoint import flatten
from models.clip import CLIPVisionConfig
from models.layers import padding_causal_mask
from models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from models.llava import LlavaConfig, LlavaForConditionalGeneration
from tests.support.xla_cost import xla_flops
from zspa_jax import estimate as est
from zspa_jax.families import param_template
from zspa_jax.pruning import PruneConfig

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
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=128,
    patch_size=8,
)
LLAVA = LlavaConfig(vision=VISION, text=TEXT, image_token_index=511)  # 256 visual tokens


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
            hidden, _ = lm.model(
                embeds, positions, padding_causal_mask(jnp.ones((1, n), jnp.int32))
            )
        else:
            mask = jnp.arange(cache_length)[None, None, :] <= jnp.arange(n)[None, :, None]
            hidden, _ = lm.model(embeds, positions, mask, KVCache.zeros(TEXT, 1, cache_length), 0)
        return lm.logits(hidden[:, -1])

    return xla_flops(prefill, state, jax.ShapeDtypeStruct((1, n, TEXT.hidden_size), jnp.float32))


def test_mha_layer_reduces_to_the_textbook_formula():
    n, d, m = 100, 512, 1376
    mha = LlamaConfig(
        hidden_size=d, intermediate_size=m, num_attention_heads=8, num_key_value_heads=8
    )
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
    tower = xla_flops(
        lambda s, p: nnx.merge(graphdef, s).selected_vision_features(p), state, pixels
    )
    assert LOW <= tower / est.vision_flops(LLAVA) <= HIGH, (tower, est.vision_flops(LLAVA))
    both = xla_flops(lambda s, p: nnx.merge(graphdef, s).image_features(p), state, pixels)
    ours = est.vision_flops(LLAVA) + est.projector_flops(LLAVA)
    assert LOW <= both / ours <= HIGH, (both, ours)
    # Feature layer -2: the last encoder layer never runs.
    assert est.estimate(LLAVA, 10)["vision_layers_run"] == VISION.num_hidden_layers - 1


@pytest.mark.parametrize(
    "dtype, kv_dtype_bytes", [("float32", None), ("float32", 2), ("bfloat16", None)]
)
def test_kv_bytes_equal_kvcache_nbytes(dtype, kv_dtype_bytes):
    text = LlamaConfig(**{**TEXT.__dict__, "dtype": dtype})
    cfg = LlavaConfig(vision=VISION, text=text, image_token_index=511)
    text_tokens, keep, new_tokens, batch = 37, 64, 11, 3
    e = est.estimate(
        cfg,
        text_tokens,
        PruneConfig(keep=keep),
        new_tokens=new_tokens,
        batch=batch,
        kv_dtype_bytes=kv_dtype_bytes,
    )
    kv_dtype = {None: None, 2: jnp.bfloat16}[kv_dtype_bytes]
    cache = KVCache.zeros(text, batch, text_tokens + keep + new_tokens, dtype=kv_dtype)
    assert e["kv_cache_bytes"] == cache.nbytes
    full = KVCache.zeros(
        text, batch, text_tokens + cfg.image_seq_length + new_tokens, dtype=kv_dtype
    )
    assert e["kv_cache_bytes_unpruned"] == full.nbytes


def test_weight_bytes_equal_the_parameter_tree():
    # (LLaVA-1.5-7B's count is checked by number below: its abstract tree takes ~10 s to build.)
    tied = LlamaConfig(
        **{
            **TEXT.__dict__,
            "tie_word_embeddings": True,
            "attention_bias": True,
            "dtype": "bfloat16",
        }
    )
    for cfg in (
        LLAVA,
        LlavaConfig(vision=VISION, text=tied, image_token_index=511, vision_feature_layer=(-2, -3)),
    ):
        flat = flatten(param_template(cfg))
        total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in flat.values())
        assert est.estimate(cfg, 10)["weight_bytes"] == total


def test_pruning_reduces_prefill_flops_by_the_expected_amount(decoder):
    text_tokens, keep = 32, 64
    n = LLAVA.image_seq_length
    e = est.estimate(LLAVA, text_tokens, PruneConfig(keep=keep))
    assert (
        e["sequence_length"] == text_tokens + keep
        and e["sequence_length_unpruned"] == text_tokens + n
    )
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
    e = est.estimate(cfg, 60, PruneConfig(keep=64), kv_dtype_bytes=2)
    # LLaMA-2-7B: 512 KiB of f16 K+V per token; 6.74e9 parameters (vocab 32064 adds 2 x 64 rows).
    assert e["kv_cache_bytes_per_token"] == 2 * 32 * 4096 * 2
    assert e["kv_cache_bytes"] == 124 * 2 * 32 * 4096 * 2
    assert e["weight_bytes_llm"] // 2 == 6_738_415_616 + 2 * 64 * 4096
    # Pruning itself costs under 0.1% of the prefill work it removes.
    assert e["pruning_flops"] < 1e-3 * (e["llm_prefill_flops_unpruned"] - e["llm_prefill_flops"])
    assert e["prefill_reduction"] > 5.0
    with pytest.raises(ValueError, match="keep"):
        est.estimate(cfg, 60, PruneConfig(keep=577))


# ----------------------------------------------------------------------------- methods' own cost
#
# XLA's cost analysis counts a while loop's body once, whatever its trip count, so the
# selection kernels are traced with `lax.fori_loop` unrolled into straight-line code (same
# ops per step), and counted on the lowered, not yet optimised program: after fusion XLA
# recomputes a loop-invariant element-wise producer (the unit vectors) inside every
# unrolled step, work the real loop does once. Element-wise work the formulas leave out
# is a few per cent at D = 64, so XLA / formula must lie in [M_LOW, M_HIGH]; a formula
# missing a leading term (an N x N product, the K x N Cholesky projection) lands outside.
M_LOW, M_HIGH = 0.9, 1.15
N_SEL, D_SEL, T_SEL, K_SEL = 96, 64, 8, 12


def _unrolled_fori_loop(lower, upper, body, init):
    for i in range(int(lower), int(upper)):
        init = body(i, init)
    return init


def lowered_flops(fn, *args) -> float:
    """XLA's FLOP count of jit(fn) lowered for these arguments, before optimisation."""
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


@pytest.fixture
def unrolled(monkeypatch):
    from zspa_jax.methods import zspaprune

    jax.clear_caches()  # kernels traced with the real fori_loop must not be reused
    monkeypatch.setattr(jax.lax, "fori_loop", _unrolled_fori_loop)
    # The greedy fill as counted: every pick one [N, D] matvec. The prefix fill (a
    # data-dependent number of picks on fewer rows, then this loop) has no static count.
    monkeypatch.setattr(zspaprune, "prefix_size", lambda n, picks: None)
    yield
    jax.clear_caches()


def _selection_xla(method: str, core_ratio=0.6) -> float:
    from zspa_jax import pruning

    v = jax.ShapeDtypeStruct((1, N_SEL, D_SEL), jnp.float32)
    t = jax.ShapeDtypeStruct((1, T_SEL, D_SEL), jnp.float32)
    m = jax.ShapeDtypeStruct((1, T_SEL), jnp.bool_)
    kw = {"core_ratio": core_ratio} if method == "zspaprune" else {}
    if method == "random":
        return lowered_flops(
            lambda v, r: pruning.select_tokens(v, keep=K_SEL, method="random", rng=r),
            v,
            jax.random.key(0),
        )
    return lowered_flops(
        lambda v, t, m: pruning.select_tokens(v, t, m, keep=K_SEL, method=method, **kw), v, t, m
    )


@pytest.mark.parametrize(
    "method, core_ratio",
    [
        ("zspaprune", 0.6),
        ("zspaprune", 0.2),
        ("relevance", 0.6),
        ("divprune", 0.6),
        ("cdpruner", 0.6),
    ],
)
def test_selection_flops_match_xla(unrolled, method, core_ratio):
    xla = _selection_xla(method, core_ratio)
    options = {"core_ratio": core_ratio} if method == "zspaprune" else None
    ours = est.method_flops(method, N_SEL, D_SEL, K_SEL, T_SEL, options)
    assert M_LOW <= xla / ours <= M_HIGH, (method, xla, ours, xla / ours)


def test_auto_core_flops_match_xla(unrolled):
    # A vmapped (or XLA-counted) batch computes DivPrune's N x N first pick whatever k is:
    # auto_zero_share = 1; without it the count misses that N x N x D product.
    from zspa_jax.methods import auto_core

    v = jax.ShapeDtypeStruct((1, N_SEL, D_SEL), jnp.float32)
    t = jax.ShapeDtypeStruct((1, T_SEL, D_SEL), jnp.float32)
    m = jax.ShapeDtypeStruct((1, T_SEL), jnp.bool_)
    xla = lowered_flops(
        lambda v, t, m: auto_core.select_auto(v, t, m, keep=K_SEL, batching="vmap"), v, t, m
    )
    ours = est.method_flops("zspaprune", N_SEL, D_SEL, K_SEL, T_SEL, {"core_ratio": "auto"})
    assert M_LOW <= xla / ours <= M_HIGH, (xla, ours, xla / ours)
    assert (
        est.method_flops(
            "zspaprune", N_SEL, D_SEL, K_SEL, T_SEL, {"core_ratio": "auto"}, auto_zero_share=0.0
        )
        < 0.5 * xla
    )


def test_prompt_agnostic_baselines_cost_next_to_nothing():
    # random is a top-k of noise, uniform a constant: 0 in the model, a few element-wise
    # ops per token in XLA's count (under 1% of the cheapest prompt-aware selection).
    assert est.method_flops("random", N_SEL, D_SEL, K_SEL, T_SEL) == 0
    assert est.method_flops("uniform", N_SEL, D_SEL, K_SEL, T_SEL) == 0
    assert _selection_xla("random") < 0.2 * est.method_flops(
        "relevance", N_SEL, D_SEL, K_SEL, T_SEL
    )


def test_tower_method_flops_match_xla(unrolled):
    from zspa_jax.methods.visionzip import visionzip_merge
    from zspa_jax.methods.vispruner import vispruner_select

    c, dh = 64, 32
    feats = jax.ShapeDtypeStruct((1, N_SEL, c), jnp.float32)
    attn = jax.ShapeDtypeStruct((1, N_SEL), jnp.float32)
    xla = lowered_flops(lambda f, a: vispruner_select(f, a, keep=K_SEL), feats, attn)
    ours = est.method_flops("vispruner", N_SEL, c, K_SEL, 0)
    assert M_LOW <= xla / ours <= M_HIGH, ("vispruner", xla, ours)
    # VisionZip at CLIP-like proportions (head width = tower width / 4). Its two
    # `jnp.nonzero`s (an integer prefix sum over the L tokens, index bookkeeping the
    # convention leaves out) are counted by XLA and subtracted here.
    c, dh, length = 256, 64, N_SEL + 1
    hidden = jax.ShapeDtypeStruct((1, length, c), jnp.float32)  # [CLS] + N patches
    probs = jax.ShapeDtypeStruct((1, length), jnp.float32)
    keys = jax.ShapeDtypeStruct((1, length, dh), jnp.float32)
    for keep in (K_SEL, 64):
        dominant = keep - min(int(keep * 10 / 64 + 0.5), keep - 1)
        bookkeeping = lowered_flops(
            lambda a: (
                jnp.nonzero(a > 0, size=dominant)[0],
                jnp.nonzero(a <= 0, size=length - dominant)[0],
            ),
            jax.ShapeDtypeStruct((length,), jnp.float32),
        )
        xla = (
            lowered_flops(lambda h, a, k: visionzip_merge(h, a, k, keep=keep), hidden, probs, keys)
            - bookkeeping
        )
        ours = est.method_flops("visionzip", N_SEL, c, keep, 0, key_dim=dh)
        assert M_LOW <= xla / ours <= M_HIGH, ("visionzip", keep, xla, ours, xla / ours)


def test_fastv_prefill_flops_match_xla(decoder):
    from zspa_jax.methods import METHODS
    from zspa_jax.prefill import prefill_pruned_at_layer

    graphdef, state = decoder
    text_tokens, n, keep, layer, image_id = 32, 160, 40, 1, 7
    ids = np.full((1, text_tokens + n), 3, np.int32)
    ids[0, 10 : 10 + n] = image_id
    length = ids.shape[1]

    def prefill(state, embeds):
        lm = nnx.merge(graphdef, state)
        positions = jnp.arange(length)[None]
        out = prefill_pruned_at_layer(
            lm.model,
            embeds,
            positions,
            jnp.ones((1, length), jnp.int32),
            method=METHODS["fastv"],
            layer=layer,
            keep=keep,
            visual_index=10 + jnp.arange(n)[None],
            visual_valid=None,
            text_mask=jnp.asarray(ids != image_id),
        )
        return lm.logits(out.hidden[:, -1])

    xla = xla_flops(
        prefill, state, jax.ShapeDtypeStruct((1, length, TEXT.hidden_size), jnp.float32)
    )
    ours = est.fastv_prefill_flops(TEXT, text_tokens, n, keep, layer)
    assert LOW <= xla / ours <= HIGH, (xla, ours, xla / ours)
    # Between the pruned and the unpruned prefill, by the share of layers before K.
    assert (
        est.llm_prefill_flops(TEXT, text_tokens + keep)
        < ours
        < est.llm_prefill_flops(TEXT, text_tokens + n)
    )
    e = est.estimate(
        LLAVA, text_tokens, PruneConfig(keep=keep, method="fastv", layer=layer), new_tokens=4
    )
    assert e["llm_prefill_flops"] == est.fastv_prefill_flops(
        TEXT, text_tokens, LLAVA.image_seq_length, keep, layer
    )
    assert e["pruning_flops"] == 0
    assert (
        e["kv_cache_bytes"]
        > est.estimate(LLAVA, text_tokens, PruneConfig(keep=keep), new_tokens=4)["kv_cache_bytes"]
    )


def test_qwen2_5_vl_3b_preset_counts_transformers_parameters():
    """The 3B preset's parameter count equals transformers' model built from the published
    Qwen2.5-VL-3B-Instruct config (on the meta device: no memory)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    expected = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    cfg = est.qwen2_5_vl_3b_config()
    assert cfg.vision.fullatt_block_indexes == (7, 15, 23, 31)
    assert est._numel_qwen_vision(cfg.vision) + est._numel_llm(cfg.text) == expected


@pytest.mark.parametrize("hw", [(672, 672), (336, 1008), (500, 300)])
def test_llava_next_cls_methods_keep_k_of_every_crop(hw):
    """On LLaVA-NeXT the [CLS]-attention methods keep K of every crop (base view included):
    the crop count is transformers' own, the LLM sees crops * K tokens, and the selection
    cost is one method call per crop."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = est.llava_v1_6_7b_config()
    crops = image_size_to_num_patches(
        hw, [list(p) for p in cfg.image_grid_pinpoints], cfg.vision.image_size
    )
    width, head = cfg.vision.hidden_size, cfg.vision.hidden_size // cfg.vision.num_attention_heads
    for method in ("visionzip", "vispruner"):
        r = est.estimate_model(cfg, 60, hw, PruneConfig(keep=64, method=method))
        assert r["kept_tokens"] == crops * 64 and r["sequence_length"] == 60 + crops * 64
        assert r["pruning_flops"] == crops * est.method_flops(
            method, 576, width, 64, 60, key_dim=head
        )
    with pytest.raises(ValueError, match="one crop"):
        est.estimate_model(cfg, 60, hw, PruneConfig(keep=577, method="visionzip"))
    assert (
        est.estimate_model(cfg, 60, hw, PruneConfig(keep=64))["kept_tokens"] == 64
    )  # other methods: K of the image
