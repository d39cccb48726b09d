"""Translate a transformers LLaVA config into `models.llava.LlavaConfig`, refusing what we
do not implement.

Every field of the HF config is either mapped, ignored because it cannot change the
forward pass (metadata, training-only settings), or checked against the one value we
implement. Anything else is an error naming the field, so an unfamiliar checkpoint is
refused instead of converted wrongly.
"""

from __future__ import annotations

from typing import Any

from models.clip import CLIPVisionConfig
from models.llama import LlamaConfig
from models.llava import LlavaConfig


class UnsupportedConfigError(ValueError):
    """The HF config uses a feature this port does not implement."""


# PretrainedConfig bookkeeping that never affects the forward pass.
_METADATA = {
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "initializer_range",
    "initializer_factor",
    "use_cache",
    "pad_token_id",
    "unk_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "torchscript",
    "pruned_heads",
    "tie_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "attention_dropout",
    "dropout",
    "hidden_dropout",
    "max_length",
    "min_length",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "num_labels",
    "keys_to_ignore_at_inference",
    "text_config_dict",
    "vision_config_dict",
    "tf_legacy_loss",
    "use_bfloat16",
    "output_scores",
    "return_dict_in_generate",
    "base_model_tp_plan",
    "base_model_pp_plan",
    "base_model_ep_plan",
}

_CLIP_MAPPED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)
# The CLIP projection head and text vocabulary are not part of the vision tower LLaVA uses.
_CLIP_IGNORED = {"projection_dim", "vocab_size"}

_LLAMA_MAPPED = (
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
    "attention_bias",
    "mlp_bias",
)
# pretraining_tp only splits matmuls during pretraining; the result is the same.
_LLAMA_IGNORED = {
    "pretraining_tp",
    "tie_word_embeddings",
    "is_llama_config",
    "transformers.js_config",
}

_LLAVA_MAPPED = (
    "image_token_index",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "projector_hidden_act",
    "multimodal_projector_bias",
)
# image_seq_length is the processor's business (and transformers writes 576 whatever the
# tower); ignore_index only matters for the training loss.
_LLAVA_IGNORED = {
    "image_seq_length",
    "ignore_index",
    "vocab_size",
    "text_config",
    "vision_config",
    "tie_word_embeddings",
    "image_token_id",
}


def _unknown(section: str, d: dict, known: set[str], errors: list[str]) -> None:
    for key in sorted(set(d) - known - _METADATA):
        errors.append(f"{section}.{key}={d[key]!r} is not implemented by this port")


def _rope_theta(text: dict, errors: list[str]) -> float:
    """Accept only plain RoPE, from either transformers 5 (`rope_parameters`) or 4.x
    (`rope_theta` + `rope_scaling`) configs."""
    params = text.get("rope_parameters")
    scaling = text.get("rope_scaling")
    if params is None:
        params = dict(scaling or {})
        params.setdefault("rope_theta", text.get("rope_theta", 10000.0))
    elif scaling and scaling != params:
        errors.append(f"text_config.rope_scaling={scaling!r} is not implemented (only plain RoPE)")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        errors.append(
            f"text_config.rope_parameters.rope_type={rope_type!r} is not implemented (only 'default' RoPE)"
        )
    extra = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if extra and rope_type == "default":
        errors.append(f"text_config.rope_parameters has unsupported keys {sorted(extra)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        errors.append(
            f"text_config.rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} "
            "is not implemented (only full rotary)"
        )
    return float(params.get("rope_theta", 10000.0))


def llava_config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> LlavaConfig:
    """Build our config from `transformers.LlavaConfig.to_dict()` output.

    Raises UnsupportedConfigError listing every field it cannot honour.
    """
    errors: list[str] = []
    if hf.get("model_type") != "llava":
        raise UnsupportedConfigError(
            f"config.model_type={hf.get('model_type')!r}; expected 'llava'"
        )
    vision = hf.get("vision_config") or {}
    text = hf.get("text_config") or {}
    if vision.get("model_type") not in ("clip_vision_model", "clip"):
        errors.append(
            f"vision_config.model_type={vision.get('model_type')!r} is not implemented (only 'clip_vision_model')"
        )
    if text.get("model_type") != "llama":
        errors.append(
            f"text_config.model_type={text.get('model_type')!r} is not implemented (only 'llama')"
        )

    _unknown("vision_config", vision, set(_CLIP_MAPPED) | _CLIP_IGNORED, errors)
    _unknown(
        "text_config",
        text,
        set(_LLAMA_MAPPED)
        | _LLAMA_IGNORED
        | {"rope_parameters", "rope_scaling", "rope_theta", "rope_interleaved"},
        errors,
    )
    _unknown("config", hf, set(_LLAVA_MAPPED) | _LLAVA_IGNORED, errors)
    rope_theta = _rope_theta(text, errors)
    if text.get("rope_interleaved", False):
        errors.append(
            "text_config.rope_interleaved=True is not implemented (only rotate-half RoPE)"
        )
    if text.get("hidden_act", "silu") != "silu":
        errors.append(
            f"text_config.hidden_act={text['hidden_act']!r} is not implemented (only 'silu')"
        )
    if errors:
        raise UnsupportedConfigError("unsupported HF config:\n  " + "\n  ".join(errors))

    # The top-level flag is the one transformers' LLaVA ties on; it is forwarded from the
    # text config by transformers itself when only the latter sets it.
    tied = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    try:
        vision_cfg = CLIPVisionConfig(
            **{k: vision[k] for k in _CLIP_MAPPED if k in vision}, dtype=dtype
        )
        text_fields = {k: text[k] for k in _LLAMA_MAPPED if k in text and text[k] is not None}
        text_cfg = LlamaConfig(
            **text_fields, rope_theta=rope_theta, tie_word_embeddings=tied, dtype=dtype
        )
        llava_fields = {k: hf[k] for k in _LLAVA_MAPPED if k in hf}
        if "image_token_index" not in llava_fields and "image_token_id" in hf:
            llava_fields["image_token_index"] = hf["image_token_id"]
        return LlavaConfig(vision=vision_cfg, text=text_cfg, **llava_fields)
    except ValueError as e:
        raise UnsupportedConfigError(f"invalid HF config: {e}") from None
