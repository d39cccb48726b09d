"""LLaVA's estimate hooks: the CLIP tower and the MLP projector (flops.py's convention).

* CLIP encoder layer on n_v = patches (+1 CLS) tokens: 4*n_v*d^2 + 2*n_v^2*d + 2*n_v*d*m
  MACs (two-layer MLP), plus the patch convolution patches * (C*p*p) * d once. Only the
  layers up to LLaVA's `vision_feature_layer` run (-2: all but the last).
* Projector: N * (d_vision*n_layers * d + d * d) MACs (linear_1, linear_2).

One fixed input size: every image becomes `cfg.image_seq_length` visual tokens.
"""

from __future__ import annotations

from models.clip import CLIPVisionConfig
from models.llava import LlavaConfig
from zspa_jax.estimate.hooks import EstimateHooks, ImagePlan
from zspa_jax.estimate.memory import dtype_bytes

__all__ = ["HOOKS", "clip_layer_macs", "projector_flops", "vision_flops", "vision_layers_run"]


def clip_layer_macs(v: CLIPVisionConfig, n: int) -> int:
    """MACs of one CLIP encoder layer on n tokens (MHA, two-layer MLP)."""
    d, m = v.hidden_size, v.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def vision_layers_run(cfg: LlavaConfig) -> int:
    """Encoder layers LLaVA actually runs: up to the deepest `vision_feature_layer`."""
    n_states = cfg.vision.num_hidden_layers + 1
    return max(layer % n_states for layer in cfg.feature_layers)


def vision_flops(cfg: LlavaConfig) -> int:
    """FLOPs of the tower for one image: patch conv + the encoder layers that run."""
    v = cfg.vision
    patches = v.num_patches
    conv = patches * v.num_channels * v.patch_size * v.patch_size * v.hidden_size
    return 2 * (conv + vision_layers_run(cfg) * clip_layer_macs(v, patches + 1))


def projector_flops(cfg: LlavaConfig, n: int | None = None) -> int:
    """Projector on n tokens (default: the image's N)."""
    n = cfg.image_seq_length if n is None else n
    din = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    return 2 * n * (din * d + d * d)


def _numel_vision(v: CLIPVisionConfig) -> int:
    d, m = v.hidden_size, v.intermediate_size
    embeddings = d + v.num_channels * v.patch_size**2 * d + (v.num_patches + 1) * d
    layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d
    return embeddings + 2 * 2 * d + v.num_hidden_layers * layer  # pre/post layer norms


def _numel_projector(cfg: LlavaConfig) -> int:
    din = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    bias = cfg.multimodal_projector_bias
    return din * d + d * d + (2 * d if bias else 0)


def _image(cfg: LlavaConfig, image_hw=None) -> ImagePlan:
    return ImagePlan(
        visual_tokens=cfg.image_seq_length,
        tower_tokens=cfg.vision.num_patches + 1,
        label="visual tokens",
    )


HOOKS = EstimateHooks(
    image=_image,
    vision_flops=lambda cfg, plan: vision_flops(cfg),
    projector_flops=projector_flops,
    tower_dims=lambda cfg: (
        cfg.vision.hidden_size,
        cfg.vision.hidden_size // cfg.vision.num_attention_heads,
    ),
    vision_weight_bytes=lambda cfg: _numel_vision(cfg.vision) * dtype_bytes(cfg.vision.dtype),
    projector_weight_bytes=lambda cfg: _numel_projector(cfg) * dtype_bytes(cfg.text.dtype),
    tower_report=lambda cfg: {"vision_layers_run": vision_layers_run(cfg)},
    image_sized=False,
    reports_decode_weights=True,
)
