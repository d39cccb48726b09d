"""Convert a Hugging Face Qwen2.5-VL checkpoint into a zspa_jax checkpoint.

    python -m convert.qwen2_5_vl SRC OUT [--dtype float32|bfloat16] [--force]

Same machinery as `convert.llava` (`convert.core`: streaming, table-driven, every
problem reported together, atomic write); this module contributes Qwen2.5-VL's config
allowlist, its key table (save_pretrained's `model.layers.*` / `visual.*` / `lm_head` and
the in-memory `model.language_model.*` / `model.visual.*`) and its processor files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from convert import core
from convert.hf_config import UnsupportedConfigError, _unknown
from convert.keymap import Transform, compile_layouts, compile_rules, table_mapper
from models.layers import ACTIVATIONS
from models.llama import LlamaConfig
from models.qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionConfig,
)

# --------------------------------------------------------------------------- key table

LAYOUTS = compile_layouts(
    (
        (r"^model\.language_model\.", "language_model.model."),  # in memory
        (r"^model\.visual\.", "visual."),  # in memory
        (r"^model\.(?=embed_tokens\.|layers\.|norm\.)", "language_model.model."),  # save_pretrained
        (r"^visual\.", "visual."),  # save_pretrained
        (r"^lm_head\.", "language_model.lm_head."),
    )
)
_LINEARS = r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|proj|lm_head)"
_NORMS = r"(?:input_layernorm|post_attention_layernorm|norm|norm1|norm2|ln_q)"
RULES = compile_rules(
    (
        (r"^(visual\.patch_embed)\.proj\.weight$", r"\1.kernel", Transform.CONV_AS_LINEAR),
        (r"^(visual\.merger)\.mlp\.0\.weight$", r"\1.fc1.kernel", Transform.LINEAR),
        (r"^(visual\.merger)\.mlp\.0\.bias$", r"\1.fc1.bias", Transform.IDENTITY),
        (r"^(visual\.merger)\.mlp\.2\.weight$", r"\1.fc2.kernel", Transform.LINEAR),
        (r"^(visual\.merger)\.mlp\.2\.bias$", r"\1.fc2.bias", Transform.IDENTITY),
        (rf"^(.*\.{_LINEARS})\.weight$", r"\1.kernel", Transform.LINEAR),
        (rf"^(.*\.{_LINEARS})\.bias$", r"\1.bias", Transform.IDENTITY),
        (r"^(.*\.embed_tokens)\.weight$", r"\1.embedding", Transform.IDENTITY),
        (rf"^(.*\.{_NORMS})\.weight$", r"\1.scale", Transform.IDENTITY),
    )
)
SKIPPED = re.compile(r"(?:\.rotary_emb\.inv_freq|\.rotary_pos_emb\.inv_freq)$")
map_key = table_mapper(LAYOUTS, RULES)

# --------------------------------------------------------------------------- config allowlist

_VISION_MAPPED = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "window_size",
    "fullatt_block_indexes",
    "out_hidden_size",
    "hidden_act",
    "tokens_per_second",  # spaces video temporal positions (M-RoPE)
)
# in_chans / spatial_patch_size: legacy hub names transformers keeps but never reads
# (it uses in_channels / patch_size), so they cannot change the forward pass.
_VISION_IGNORED = {"rope_parameters", "in_chans", "spatial_patch_size"}
_TEXT_MAPPED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "hidden_act",
)
# sliding_window / max_window_layers only matter with use_sliding_window (refused below).
_TEXT_IGNORED = {
    "tie_word_embeddings",
    "sliding_window",
    "max_window_layers",
    "use_sliding_window",
    "layer_types",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
}
_TOP_MAPPED = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# vision_token_id: a legacy hub field the model never reads.
_TOP_IGNORED = {
    "text_config",
    "vision_config",
    "tie_word_embeddings",
    "vocab_size",
    "vision_token_id",
}


def _text_rope(text: dict, errors: list[str]) -> tuple[float, tuple[int, ...] | None]:
    params = text.get("rope_parameters") or dict(text.get("rope_scaling") or {})
    params = dict(params)
    params.setdefault("rope_theta", text.get("rope_theta", 1000000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        errors.append(
            f"text_config.rope_parameters.rope_type={rope_type!r} is not implemented (only M-RoPE, 'default')"
        )
    extra = set(params) - {
        "rope_type",
        "type",
        "rope_theta",
        "mrope_section",
        "partial_rotary_factor",
    }
    if extra:
        errors.append(f"text_config.rope_parameters has unsupported keys {sorted(extra)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        errors.append(
            f"text_config.rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} is not implemented"
        )
    section = params.get("mrope_section")
    if section is None:
        errors.append(
            "text_config.rope_parameters.mrope_section is missing (Qwen2.5-VL needs M-RoPE)"
        )
    return float(params["rope_theta"]), None if section is None else tuple(int(s) for s in section)


def qwen2_5_vl_config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> Qwen2_5_VLConfig:
    """Our config from `transformers.Qwen2_5_VLConfig.to_dict()`; UnsupportedConfigError
    lists every field it cannot honour."""
    if hf.get("model_type") != "qwen2_5_vl":
        raise UnsupportedConfigError(
            f"config.model_type={hf.get('model_type')!r}; expected 'qwen2_5_vl'"
        )
    errors: list[str] = []
    missing = [key for key in ("text_config", "vision_config") if not hf.get(key)]
    if missing:  # every field below lives in one of them: nothing else can be checked
        raise UnsupportedConfigError(
            f"config has no {' and no '.join(missing)} (a Qwen2.5-VL config has both)"
        )
    vision = hf["vision_config"]
    text = hf["text_config"]
    _unknown("vision_config", vision, set(_VISION_MAPPED) | _VISION_IGNORED, errors)
    _unknown("text_config", text, set(_TEXT_MAPPED) | _TEXT_IGNORED, errors)
    _unknown("config", hf, set(_TOP_MAPPED) | _TOP_IGNORED, errors)

    vrope = vision.get("rope_parameters") or {"rope_type": "axial", "rope_theta": 10000.0}
    if vrope.get("rope_type", "axial") != "axial" or set(vrope) - {"rope_type", "rope_theta"}:
        errors.append(
            f"vision_config.rope_parameters={vrope!r} is not implemented (only axial 2-D RoPE)"
        )
    if text.get("use_sliding_window", False):
        errors.append(
            "text_config.use_sliding_window=True is not implemented (only full attention)"
        )
    layer_types = set(text.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        errors.append(
            f"text_config.layer_types={sorted(layer_types)} is not implemented (only 'full_attention')"
        )
    for section, d in (("vision_config", vision), ("text_config", text)):
        act = d.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            errors.append(f"{section}.hidden_act={act!r} is not implemented")
    rope_theta, mrope_section = _text_rope(text, errors)
    if errors:
        raise UnsupportedConfigError("unsupported HF config:\n  " + "\n  ".join(errors))

    tied = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    try:
        vision_cfg = Qwen2_5_VLVisionConfig(
            **{k: vision[k] for k in _VISION_MAPPED if k in vision},
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            dtype=dtype,
        )
        text_cfg = LlamaConfig(
            **{k: text[k] for k in _TEXT_MAPPED if k in text and text[k] is not None},
            rope_theta=rope_theta,
            mrope_section=mrope_section,
            qkv_bias=True,  # Qwen2: biases on q, k, v; none on o_proj
            tie_word_embeddings=tied,
            dtype=dtype,
        )
        return Qwen2_5_VLConfig(
            vision=vision_cfg, text=text_cfg, **{k: hf[k] for k in _TOP_MAPPED if k in hf}
        )
    except ValueError as e:
        raise UnsupportedConfigError(f"invalid HF config: {e}") from None


SPEC = core.FamilySpec(
    name="qwen2_5_vl",
    model_cls=Qwen2_5_VLForConditionalGeneration,
    config_from_hf=qwen2_5_vl_config_from_hf,
    map_key=map_key,
    skipped=SKIPPED,
    processor_files=core.COMMON_PROCESSOR_FILES + ("video_preprocessor_config.json",),
)


def convert(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Convert SRC into OUT; returns a summary dict. Leaves OUT untouched on failure."""
    return core.convert(SPEC, src, out, dtype=dtype, force=force, progress=progress)


def main(argv: list[str] | None = None) -> int:
    return core.main(SPEC, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
