"""Convert a Hugging Face LLaVA-NeXT (LLaVA-1.6) checkpoint into a zspa_jax checkpoint.

    python -m convert.llava_next SRC OUT [--dtype float32|bfloat16] [--force]

Same machinery as `convert.llava` (`convert.core`: streaming, table-driven, every problem
reported together, atomic write). LLaVA-NeXT's weights are LLaVA's plus `image_newline`,
under the same three layouts (transformers' in-memory `model.*`, what transformers 5's
save_pretrained writes, and the legacy hub layout); its config is LLaVA's plus
`image_grid_pinpoints`, read by LLaVA's allowlist (`convert.hf_config`). A Mistral
language model (llava-v1.6-mistral) is the shared LLaMA decoder exactly when it uses no
sliding window (`sliding_window: null`); any other is refused by name. The saved
`LlavaNextProcessor` (tokenizer, image processor, chat template) is copied along.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from convert import core, keymap
from convert.core import ConversionError  # noqa: F401  (re-exported: what convert() raises)
from convert.hf_config import UnsupportedConfigError, llava_config_from_hf
from convert.keymap import Transform
from models.llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration

# --------------------------------------------------------------------------- key table

# `model.image_newline` in memory, `image_newline` as saved (v5 and legacy hub alike).
_NEWLINE = re.compile(r"^(?:model\.)?image_newline$")


def map_key(key: str) -> tuple[str, Transform] | None:
    """Our parameter path and transform for a HF LLaVA-NeXT key (LLaVA's table + image_newline)."""
    if _NEWLINE.match(key):
        return "image_newline", Transform.IDENTITY
    return keymap.map_key(key)


# --------------------------------------------------------------------------- config allowlist

TEXT_MODEL_TYPES = ("llama", "mistral")


def _text_config(text: dict, errors: list[str]) -> dict:
    """The text config as LLaVA's reader takes it: a Mistral one becomes LLaMA when it maps
    exactly onto the shared decoder (no sliding window; Mistral has no q/k/v/o or MLP biases,
    SwiGLU, RMSNorm and rotate-half RoPE like LLaMA)."""
    text = dict(text)
    kind = text.get("model_type")
    if kind == "mistral":
        window = text.pop("sliding_window", None)
        if window is not None:
            errors.append(
                f"text_config.sliding_window={window!r} (Mistral sliding-window attention) is not implemented "
                "(only full attention, sliding_window null)"
            )
        layer_types = set(text.pop("layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            errors.append(
                f"text_config.layer_types={sorted(layer_types)} is not implemented (only 'full_attention')"
            )
        text["model_type"] = "llama"
    elif kind != "llama":
        errors.append(
            f"text_config.model_type={kind!r} is not implemented (only {' and '.join(map(repr, TEXT_MODEL_TYPES))})"
        )
        text["model_type"] = "llama"  # reported above; still check the other fields
    return text


def llava_next_config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> LlavaNextConfig:
    """Our config from `transformers.LlavaNextConfig.to_dict()`; UnsupportedConfigError
    lists every field it cannot honour."""
    if hf.get("model_type") != "llava_next":
        raise UnsupportedConfigError(
            f"config.model_type={hf.get('model_type')!r}; expected 'llava_next'"
        )
    errors: list[str] = []
    hf = dict(hf)
    pinpoints = hf.pop("image_grid_pinpoints", None)
    if not pinpoints:
        errors.append("config.image_grid_pinpoints is missing (LLaVA-NeXT's anyres resolutions)")
    if hf.get("vision_feature_select_strategy", "default") != "default":
        errors.append(
            f"config.vision_feature_select_strategy={hf['vision_feature_select_strategy']!r} is not implemented for "
            "LLaVA-NeXT (only 'default': a CLIP [CLS] token does not fit the crop grid)"
        )
        hf.pop("vision_feature_select_strategy")
    hf["text_config"] = _text_config(hf.get("text_config") or {}, errors)
    hf["model_type"] = "llava"  # every other field is LLaVA's: its allowlist reads them
    try:
        base = llava_config_from_hf(hf, dtype=dtype)
    except UnsupportedConfigError as e:
        message = str(e)
        head = "unsupported HF config:\n  "
        errors.extend(message[len(head) :].split("\n  ") if message.startswith(head) else [message])
        base = None
    if errors:
        raise UnsupportedConfigError("unsupported HF config:\n  " + "\n  ".join(errors))
    try:
        return LlavaNextConfig(
            vision=base.vision,
            text=base.text,
            image_token_index=base.image_token_index,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=base.vision_feature_layer,
            vision_feature_select_strategy=base.vision_feature_select_strategy,
            projector_hidden_act=base.projector_hidden_act,
            multimodal_projector_bias=base.multimodal_projector_bias,
        )
    except ValueError as e:
        raise UnsupportedConfigError(f"invalid HF config: {e}") from None


SPEC = core.FamilySpec(
    name="llava_next",
    model_cls=LlavaNextForConditionalGeneration,
    config_from_hf=llava_next_config_from_hf,
    map_key=map_key,
    skipped=keymap.SKIPPED,
)
PROCESSOR_FILES = SPEC.processor_files


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
