"""Flax NNX ports of the pieces of a LLaVA-style vision-language model.

The modules here know nothing about pruning or generation policy: they expose vision
features, projected visual tokens, input embeddings and a decoder with a KV cache.
"""

from models.clip import CLIPVisionConfig, CLIPVisionModel
from models.llama import KVCache, LlamaConfig, LlamaForCausalLM, LlamaModel
from models.llava import LlavaConfig, LlavaForConditionalGeneration, LlavaMultiModalProjector

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
]
