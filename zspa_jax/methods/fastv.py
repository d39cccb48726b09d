"""FastV: drop the visual tokens the last prompt token attends to least, inside the LLM.

Paper: L. Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
Inference Acceleration for Large Vision-Language Models", ECCV 2024, arXiv:2403.06764
(section 4). Official code: github.com/pkunlp-icler/FastV,
`src/FastV/llava-hf/transformers/.../modeling_llama.py` (`fastv_forward`, in-place variant).

With the decoder layer index K (the `layer` option, default 2): layers 0..K-1 run on the
whole prompt; the attention of layer K-1 (the K-th layer; what it computed for the last
prompt token, i.e. the last position of a left-padded row), averaged over heads, scores
the N visual tokens; the `keep` best (ties -> lower index) stay, and layers K..end and
their KV cache only ever hold the L - N + keep remaining tokens (`zspa_jax.prefill`).
Kept tokens keep their original RoPE positions (the official code sets `position_ids =
keep_indexs`), and decoding continues at the unpruned prompt's last position + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zspa_jax.methods.base import LayerInputs, Method, layer_option, no_flops

__all__ = ["METHOD", "fastv_select"]


def fastv_select(inputs: LayerInputs, *, keep: int) -> jax.Array:
    """int32 [B, keep], ascending: the visual tokens with the largest last-query attention."""
    scores = jnp.take_along_axis(inputs.attention_row, inputs.visual_index, axis=1)
    if inputs.visual_valid is not None:
        scores = jnp.where(inputs.visual_valid, scores, -jnp.inf)  # padding slots: never kept
    return jnp.sort(lax.top_k(scores, keep)[1], axis=1).astype(jnp.int32)  # ties -> lower index


METHOD = Method(
    name="fastv",
    stage="llm",
    select=fastv_select,
    flops=no_flops,  # a top-k over one attention row; its saving is in the LLM (estimate)
    summary="the visual tokens the last prompt token attends to most at LLM layer K; later layers never hold the others",
    citation="arXiv:2403.06764, github.com/pkunlp-icler/FastV",
    keeps_positions=True,
    options=(layer_option("2: the paper's K = 2 (arXiv 2403.06764, 'after layer 2')"),),
)
