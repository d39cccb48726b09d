"""zspa_jax: LLaVA-style vision-language models in JAX/Flax NNX with ZSPAPrune,
prompt-aware visual-token pruning (arXiv 2510.17197).

    vlm = zspa_jax.load("converted/")                 # python -m convert.llava SRC converted/
    out = zspa_jax.generate(vlm, "<image> what is this?", image, prune=zspa_jax.PruneConfig(keep=64))
"""

from zspa_jax.forward import forward
from zspa_jax.generation import GenerateOutput, GenerateResult, generate, generate_tokens
from zspa_jax.loading import VLM, load
from zspa_jax.pruning import PRUNE_METHODS, PruneConfig, gather_tokens, select_tokens

__all__ = [
    "PRUNE_METHODS",
    "GenerateOutput",
    "GenerateResult",
    "PruneConfig",
    "VLM",
    "forward",
    "gather_tokens",
    "generate",
    "generate_tokens",
    "load",
    "select_tokens",
]
__version__ = "0.1.0"
