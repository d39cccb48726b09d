"""FLOPs and memory estimator for LLaVA and Qwen2.5-VL models with ZSPAPrune pruning.

    python -m zspa_jax.estimate [--text-tokens 60] [--new-tokens 0] [--json]
    python -m zspa_jax.estimate --model qwen2.5-vl-7b --image 1344x1008 [--keep 1230 256 128 64]
    python -m zspa_jax.estimate --model qwen2.5-vl-7b --video 16x448x448 [--fps 2]
    python -m zspa_jax.estimate --model M --mesh data=D,model=M [--batch B] [--json]
    python -m zspa_jax.estimate --method dart --layer 3 --image-pivots 2 --keep 64 [--ratio R]

(the pruning flags are `python -m zspa_jax generate`'s, one per method option)

prints, for LLaVA-1.5-7B (CLIP ViT-L/14-336 + LLaMA-2-7B), the cost of each stage at
keep in {576, 192, 128, 64}; or for Qwen2.5-VL-7B at one image size (its visual token
count follows the image: `estimate_qwen2_5_vl`); or the per-device bytes on a mesh.

One job per module; the core (flops.py, memory.py, hooks.py, presets.py) imports nothing
from zspa_jax.families, and only model.py and cli.py, on top, look a config's family up:

    flops.py        the counting convention (its docstring) and the generic counts: decoder
                    layer, LLM prefill/decode, FastV's split, each method's selection
    hooks.py        EstimateHooks / ImagePlan: what a family answers about its image side
    memory.py       KV-cache and weight bytes, per-device bytes of a model on a mesh
    presets.py      named real configs (LLaVA-1.5-7B/13B, Qwen2.5-VL-7B/72B), `MODELS`
    model.py        the whole-model estimate: `estimate_model` reads the family's hooks
                    (`family_of(cfg).estimate`); `estimate` (LLaVA) and
                    `estimate_qwen2_5_vl` are that call with each family's arguments;
                    `mesh_bytes` with the family's model
    cli.py          `main`: argument parsing and the tables

Each family's hooks live beside its record (zspa_jax.families.<family>.estimate: LLaVA's
CLIP tower and projector, LLaVA-NeXT's crops, Qwen2.5-VL's grid and windowed ViT). The
names below other than the core's are imported on first use, so that importing a family's
hooks (which import the core) loads neither the CLI, the presets nor the registry.

Convention (every count in FLOPs = multiply-accumulates x 2, matrix products only,
attention over the full n x n square): zspa_jax.estimate.flops's docstring; the towers'
formulas: zspa_jax.families.llava.estimate and zspa_jax.families.qwen2_5_vl.estimate.
"""

from __future__ import annotations

import importlib

from zspa_jax.estimate.flops import (
    decode_flops,
    decoder_layer_macs,
    fastv_prefill_flops,
    language_model_flops,
    llm_prefill_flops,
    method_flops,
    pruning_flops,
)
from zspa_jax.estimate.hooks import EstimateHooks, ImagePlan
from zspa_jax.estimate.memory import (  # noqa: F401 (_numel_llm: read by tests)
    _numel_llm,
    decode_weight_bytes,
    kv_cache_bytes,
)

# name -> the module that defines it, imported on first use (module docstring)
_LAZY = {
    **dict.fromkeys(
        ("estimate", "estimate_model", "estimate_qwen2_5_vl", "hooks_of", "mesh_bytes"),
        "zspa_jax.estimate.model",
    ),
    "main": "zspa_jax.estimate.cli",
    **dict.fromkeys(
        (
            "LLAVA_1_5_7B",
            "MODELS",
            "llava_1_5_7b_config",
            "llava_1_5_13b_config",
            "llava_v1_6_7b_config",
            "qwen2_5_vl_3b_config",
            "qwen2_5_vl_7b_config",
            "qwen2_5_vl_72b_config",
        ),
        "zspa_jax.estimate.presets",
    ),
    **dict.fromkeys(
        ("clip_layer_macs", "projector_flops", "vision_flops", "vision_layers_run"),
        "zspa_jax.families.llava.estimate",
    ),
    **dict.fromkeys(
        (
            "_numel_qwen_vision",
            "_qwen_window_sizes",
            "qwen_image_grid",
            "qwen_video_grid",
            "qwen_vision_flops",
        ),
        "zspa_jax.families.qwen2_5_vl.estimate",
    ),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "clip_layer_macs",
    "decoder_layer_macs",
    "estimate",
    "llava_1_5_7b_config",
    "LLAVA_1_5_7B",
    "pruning_flops",
    "method_flops",
    "fastv_prefill_flops",
    "estimate_qwen2_5_vl",
    "qwen2_5_vl_3b_config",
    "qwen2_5_vl_7b_config",
    "qwen_image_grid",
    "qwen_video_grid",
    # public attributes of the old module, now listed too
    "MODELS",
    "decode_flops",
    "kv_cache_bytes",
    "llava_1_5_13b_config",
    "llava_v1_6_7b_config",
    "llm_prefill_flops",
    "main",
    "mesh_bytes",
    "projector_flops",
    "qwen2_5_vl_72b_config",
    "qwen_vision_flops",
    "vision_flops",
    "vision_layers_run",
    # new with the package: the family hooks and the generic estimate
    "EstimateHooks",
    "ImagePlan",
    "decode_weight_bytes",
    "estimate_model",
    "hooks_of",
    "language_model_flops",
]
