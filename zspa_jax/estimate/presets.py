"""Named real configs (no weights needed) and the CLI's model table `MODELS`."""

from __future__ import annotations

import dataclasses

from models.clip import CLIPVisionConfig
from models.llama import LlamaConfig
from models.llava import LlavaConfig
from models.llava_next import LlavaNextConfig
from models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig

__all__ = [
    "LLAVA_1_5_7B",
    "MODELS",
    "llava_1_5_7b_config",
    "llava_1_5_13b_config",
    "llava_v1_6_7b_config",
    "qwen2_5_vl_3b_config",
    "qwen2_5_vl_7b_config",
    "qwen2_5_vl_72b_config",
]


def llava_1_5_7b_config(dtype: str = "float16") -> LlavaConfig:
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 (24 layers, d 1024, m 4096,
    16 heads, 577 tokens, feature layer -2) -> projector 1024 -> 4096 -> 4096 (gelu) ->
    LLaMA-2-7B (32 layers, d 4096, m 11008, 32 heads, vocab 32064)."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        dtype=dtype,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        dtype=dtype,
    )
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


LLAVA_1_5_7B = llava_1_5_7b_config()


def llava_1_5_13b_config(dtype: str = "float16") -> LlavaConfig:
    """LLaVA-1.5-13B (llava-hf/llava-1.5-13b-hf): the 7B's tower, projector 1024 -> 5120 ->
    5120, LLaMA-2-13B (40 layers, d 5120, m 13824, 40 heads, vocab 32064)."""
    cfg = llava_1_5_7b_config(dtype)
    text = dataclasses.replace(
        cfg.text,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        head_dim=None,
    )
    return dataclasses.replace(cfg, text=text)


def qwen2_5_vl_7b_config(
    dtype: str = "bfloat16", text_layers: int = 28, vision_depth: int = 32
) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct: ViT 32 blocks (d 1280, m 3420, 16 heads, patch 14, window
    112, full attention at 7/15/23/31) -> merger -> Qwen2-7B (28 layers, d 3584, m 18944,
    28 heads / 4 KV heads, vocab 152064, M-RoPE [16, 24, 24]). Fewer layers on request
    (full-attention blocks kept at the same relative depths)."""
    full = tuple(
        sorted({min(vision_depth - 1, round((i + 1) * vision_depth / 4) - 1) for i in range(4)})
    )
    vision = Qwen2_5_VLVisionConfig(
        depth=vision_depth,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=full,
        out_hidden_size=3584,
        tokens_per_second=2,
        dtype=dtype,
    )
    text = LlamaConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=text_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=128000,
        qkv_bias=True,
        mrope_section=(16, 24, 24),
        dtype=dtype,
    )
    return Qwen2_5_VLConfig(vision=vision, text=text)


def qwen2_5_vl_3b_config(
    dtype: str = "bfloat16", text_layers: int = 36, vision_depth: int = 32
) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B-Instruct: the 7B's ViT with merger output 2048 -> Qwen2.5-3B (36 layers,
    d 2048, m 11008, 16 heads / 2 KV heads, vocab 151936, tied embeddings). Fewer layers on
    request, as for the 7B."""
    cfg = qwen2_5_vl_7b_config(dtype, vision_depth=vision_depth)
    vision = dataclasses.replace(cfg.vision, out_hidden_size=2048)
    text = dataclasses.replace(
        cfg.text,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=text_layers,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=None,
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLConfig(vision=vision, text=text)


def qwen2_5_vl_72b_config(dtype: str = "bfloat16") -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-72B-Instruct: the 7B's ViT with MLP width 3456 and merger output 8192 ->
    Qwen2-72B (80 layers, d 8192, m 29568, 64 heads / 8 KV heads, vocab 152064)."""
    cfg = qwen2_5_vl_7b_config(dtype)
    vision = dataclasses.replace(cfg.vision, intermediate_size=3456, out_hidden_size=8192)
    text = dataclasses.replace(
        cfg.text,
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=None,
    )
    return Qwen2_5_VLConfig(vision=vision, text=text)


def llava_v1_6_7b_config(dtype: str = "float16") -> LlavaNextConfig:
    """LLaVA-NeXT-7B (llava-hf/llava-v1.6-vicuna-7b-hf): LLaVA-1.5-7B's tower, projector and
    decoder, with anyres crops of 336 pixels on the pinpoints 336x672, 672x336, 672x672,
    1008x336 and 336x1008 (a base view plus up to four crops, 576 tokens each)."""
    base = llava_1_5_7b_config(dtype)
    return LlavaNextConfig(
        vision=base.vision,
        text=base.text,
        image_token_index=32000,
        image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


# The CLI's `--model` table: name -> config factory (no arguments).
MODELS = {
    "llava-1.5-7b": llava_1_5_7b_config,
    "llava-1.5-13b": llava_1_5_13b_config,
    "llava-v1.6-7b": llava_v1_6_7b_config,
    "qwen2.5-vl-3b": qwen2_5_vl_3b_config,
    "qwen2.5-vl-7b": qwen2_5_vl_7b_config,
    "qwen2.5-vl-72b": qwen2_5_vl_72b_config,
}
