"""Random re-initialisation of a transformers model, large enough that bugs show."""

from __future__ import annotations

import re

import torch

_NORM_RE = re.compile(r"(layer_?norm|layrnorm|_norm\b|\.norm\b|norm1|norm2)")


@torch.no_grad()
def randomize_weights_(
    model: torch.nn.Module, seed: int, linear_std: float = 0.15, embed_std: float = 1.0
) -> None:
    """Re-initialise every parameter so bugs are visible (HF's init: std 0.02, norms = 1, biases = 0).

    Norm scales ~ U(0.5, 1.5), norm biases and linear biases ~ N(0, 0.1^2), linear
    weights ~ N(0, linear_std^2) (gain ~1 at these widths), text embeddings
    ~ N(0, embed_std^2) (RMSNorm follows; keep it small when the head is tied to them,
    or the logits grow to ~40) and N(0, 0.5^2) for CLIP's class/position embeddings.
    """
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights
            continue
        seen.add(id(p))
        n = name.lower()
        if _NORM_RE.search(n) and n.endswith("weight"):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif n.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif "embed_tokens" in n:
            p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
        elif "class_embedding" in n or "position_embedding" in n:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "patch_embedding" in n:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in**0.5))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * linear_std)
