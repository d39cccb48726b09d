"""zspa_jax: LLaVA-style vision-language models in JAX/Flax NNX with ZSPAPrune,
prompt-aware visual-token pruning (arXiv 2510.17197)."""

from zspa_jax.forward import forward
from zspa_jax.loading import VLM, load

__all__ = ["VLM", "forward", "load"]
__version__ = "0.1.0"
