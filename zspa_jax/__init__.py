"""zspa_jax: LLaVA-style vision-language models in JAX/Flax NNX with ZSPAPrune,
prompt-aware visual-token pruning (arXiv 2510.17197).

    vlm = zspa_jax.load("converted/")                 # python -m convert.llava SRC converted/
    out = zspa_jax.generate(vlm, "What is this?", image, prune=zspa_jax.PruneConfig(keep=64))
    batch = zspa_jax.encode(vlm, ["What is this?"], [image])   # the arrays the array API takes
    logits = zspa_jax.forward(vlm, **batch)
    vlm = zspa_jax.load("converted/", mesh=jax.make_mesh((2, 4), ("data", "model")))  # 8 devices

A prompt may contain the image token (e.g. "<image>") to place the image; without it the
image goes first. It is never counted twice.
"""

from zspa_jax.batch import encode
from zspa_jax.forward import forward
from zspa_jax.generation import GenerateOutput, GenerateResult, generate, generate_tokens
from zspa_jax.loading import VLM, load, shard
from zspa_jax.pruning import (
    PRUNE_METHODS,
    PruneConfig,
    auto_core_ratio,
    gather_tokens,
    select_tokens,
)
from zspa_jax.video import Video

__all__ = [
    "PRUNE_METHODS",
    "GenerateOutput",
    "GenerateResult",
    "PruneConfig",
    "VLM",
    "Video",
    "encode",
    "auto_core_ratio",
    "forward",
    "gather_tokens",
    "generate",
    "generate_tokens",
    "load",
    "select_tokens",
    "shard",
]
__version__ = "0.1.0"
