"""Flax NNX ports of the pieces of LLaVA-style vision-language models (LLaVA, Qwen2.5-VL).

The modules here know nothing about pruning or generation policy: they expose vision
features, projected visual tokens, input embeddings and a decoder with a KV cache.
"""

from models.clip import CLIPVisionConfig, CLIPVisionModel
from models.llama import KVCache, LlamaConfig, LlamaForCausalLM, LlamaModel
from models.llava import LlavaConfig, LlavaForConditionalGeneration, LlavaMultiModalProjector
from models.qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionConfig,
)

__all__ = [
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlavaConfig",
    "LlavaForConditionalGeneration",
    "LlavaMultiModalProjector",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLVisionConfig",
]
