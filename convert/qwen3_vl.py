"""Convert a Hugging Face Qwen3-VL checkpoint into a zspa_jax checkpoint.

    python -m convert.qwen3_vl SRC OUT [--dtype float32|bfloat16] [--force]

Same machinery as `convert.qwen2_5_vl` (`convert.core`); this module contributes
Qwen3-VL's config allowlist and its key table: the hub's and transformers 5's
save_pretrained names (`model.language_model.*`, `model.visual.*`, `lm_head.*`) and the
older top-level `model.layers.*` / `visual.*` names.
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
from models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLVisionConfig

# --------------------------------------------------------------------------- key table

LAYOUTS = compile_layouts(
    (
        (r"^model\.language_model\.", "language_model.model."),  # hub, save_pretrained
        (r"^model\.visual\.", "visual."),  # hub, save_pretrained
        (r"^model\.(?=embed_tokens\.|layers\.|norm\.)", "language_model.model."),  # older
        (r"^visual\.", "visual."),  # older
        (r"^lm_head\.", "language_model.lm_head."),
    )
)
_LINEARS = (
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|proj|linear_fc1|linear_fc2"
    r"|lm_head)"
)
_RMS_NORMS = r"(?:input_layernorm|post_attention_layernorm|q_norm|k_norm)"
# The vision blocks' and mergers' LayerNorms; "norm" is also the decoder's final RMSNorm.
_LAYER_NORMS = r"(?:norm1|norm2|norm)"
RULES = compile_rules(
    (
        (r"^(visual\.patch_embed)\.proj\.weight$", r"\1.kernel", Transform.CONV_AS_LINEAR),
        (r"^(visual\.patch_embed)\.proj\.bias$", r"\1.bias", Transform.IDENTITY),
        (r"^(visual\.pos_embed)\.weight$", r"\1.embedding", Transform.IDENTITY),
        (rf"^(.*\.{_LINEARS})\.weight$", r"\1.kernel", Transform.LINEAR),
        (rf"^(.*\.{_LINEARS})\.bias$", r"\1.bias", Transform.IDENTITY),
        (r"^(.*\.embed_tokens)\.weight$", r"\1.embedding", Transform.IDENTITY),
        (rf"^(.*\.(?:{_RMS_NORMS}|{_LAYER_NORMS}))\.weight$", r"\1.scale", Transform.IDENTITY),
        (rf"^(visual\..*\.{_LAYER_NORMS})\.bias$", r"\1.bias", Transform.IDENTITY),
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
    "out_hidden_size",
    "num_position_embeddings",
    "deepstack_visual_indexes",
    "hidden_act",
)
_VISION_IGNORED = {"rope_parameters"}  # checked below
_TEXT_MAPPED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "hidden_act",
    "attention_bias",  # biases on q, k, v and o together, as LLaMA's flag
)
_TEXT_IGNORED = {
    "tie_word_embeddings",
    "layer_types",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
}
_TOP_MAPPED = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_TOP_IGNORED = {"text_config", "vision_config", "tie_word_embeddings"}
# transformers' text rotary falls back to this when the config has no mrope_section
DEFAULT_MROPE_SECTION = (24, 20, 20)


def _text_rope(text: dict, errors: list[str]) -> tuple[float, tuple[int, ...]]:
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    params.setdefault("rope_theta", text.get("rope_theta", 500000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        errors.append(
            f"text_config.rope_parameters.rope_type={rope_type!r} is not implemented (only 'default')"
        )
    extra = set(params) - {
        "rope_type",
        "type",
        "rope_theta",
        "mrope_section",
        "mrope_interleaved",
        "partial_rotary_factor",
    }
    if extra:
        errors.append(f"text_config.rope_parameters has unsupported keys {sorted(extra)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        errors.append(
            f"text_config.rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} is not implemented"
        )
    # transformers interleaves the t/h/w frequencies whatever this flag says; a checkpoint
    # that asks for blocks would be read against its intent, so it is refused.
    if params.get("mrope_interleaved", True) is not True:
        errors.append(
            f"text_config.rope_parameters.mrope_interleaved={params['mrope_interleaved']!r} is not "
            "implemented (Qwen3-VL interleaves the M-RoPE frequencies)"
        )
    section = params.get("mrope_section") or DEFAULT_MROPE_SECTION
    return float(params["rope_theta"]), tuple(int(s) for s in section)


def qwen3_vl_config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> Qwen3VLConfig:
    """Our config from `transformers.Qwen3VLConfig.to_dict()`; UnsupportedConfigError
    lists every field it cannot honour."""
    if hf.get("model_type") != "qwen3_vl":
        raise UnsupportedConfigError(
            f"config.model_type={hf.get('model_type')!r}; expected 'qwen3_vl'"
        )
    missing = [key for key in ("text_config", "vision_config") if not hf.get(key)]
    if missing:  # every field below lives in one of them: nothing else can be checked
        raise UnsupportedConfigError(
            f"config has no {' and no '.join(missing)} (a Qwen3-VL config has both)"
        )
    errors: list[str] = []
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
    for field in ("patch_size", "temporal_patch_size"):
        if not isinstance(vision.get(field, 1), int):
            errors.append(
                f"vision_config.{field}={vision[field]!r} is not implemented (only one int)"
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
        vision_cfg = Qwen3VLVisionConfig(
            **{k: vision[k] for k in _VISION_MAPPED if k in vision},
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            dtype=dtype,
        )
        text_cfg = LlamaConfig(
            **{k: text[k] for k in _TEXT_MAPPED if k in text and text[k] is not None},
            rope_theta=rope_theta,
            mrope_section=mrope_section,
            mrope_interleaved=True,
            qk_norm=True,
            tie_word_embeddings=tied,
            dtype=dtype,
        )
        return Qwen3VLConfig(
            vision=vision_cfg, text=text_cfg, **{k: hf[k] for k in _TOP_MAPPED if k in hf}
        )
    except ValueError as e:
        raise UnsupportedConfigError(f"invalid HF config: {e}") from None


SPEC = core.FamilySpec(
    name="qwen3_vl",
    model_cls=Qwen3VLForConditionalGeneration,
    config_from_hf=qwen3_vl_config_from_hf,
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
