"""The tiny random transformers LLaVA-1.5 (CLIP tower, LLaMA decoder), built offline."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.support.random_weights import randomize_weights_
from tests.support.tokenizers import IMAGE_TOKEN, build_tiny_tokenizer, save_tiny_processor

TINY_DEFAULTS: dict[str, Any] = dict(
    # CLIP tower: image 28 / patch 7 -> 16 patches (+ CLS)
    image_size=28,
    patch_size=7,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=3,
    vision_heads=4,
    vision_hidden_act="quick_gelu",
    # LLaMA decoder; vocab covers the 301-token tiny tokenizer (<image> = 300)
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    text_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    # LLaVA glue
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    seed=0,
    with_processor=True,
)


@dataclasses.dataclass
class TinyLlava:
    name: str
    path: Path  # save_pretrained directory (v5 layout), with processor files
    hf: Any  # transformers LlavaForConditionalGeneration, eval, f32
    options: dict
    image_token_index: int
    tokens_per_image: int  # visual tokens per image after the select strategy
    pad_token_id: int
    bos_token_id: int
    processor: Any | None

    @property
    def vocab_size(self) -> int:
        return self.options["vocab_size"]

    @property
    def image_size(self) -> int:
        return self.options["image_size"]


def hf_llava_config(options: dict, image_token_index: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    o = options
    vision = CLIPVisionConfig(
        hidden_size=o["vision_hidden_size"],
        intermediate_size=o["vision_intermediate_size"],
        num_hidden_layers=o["vision_layers"],
        num_attention_heads=o["vision_heads"],
        image_size=o["image_size"],
        patch_size=o["patch_size"],
        hidden_act=o["vision_hidden_act"],
        projection_dim=o["vision_hidden_size"],
    )
    text = LlamaConfig(
        vocab_size=o["vocab_size"],
        hidden_size=o["hidden_size"],
        intermediate_size=o["intermediate_size"],
        num_hidden_layers=o["text_layers"],
        num_attention_heads=o["num_attention_heads"],
        num_key_value_heads=o["num_key_value_heads"],
        rope_theta=o["rope_theta"],
        rms_norm_eps=o["rms_norm_eps"],
        max_position_embeddings=o["max_position_embeddings"],
        tie_word_embeddings=o["tie_word_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    layer = o["vision_feature_layer"]
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        vision_feature_layer=list(layer) if isinstance(layer, (list, tuple)) else layer,
        vision_feature_select_strategy=o["vision_feature_select_strategy"],
        projector_hidden_act=o["projector_hidden_act"],
        tie_word_embeddings=o["tie_word_embeddings"],
        image_seq_length=(o["image_size"] // o["patch_size"]) ** 2,
    )


def _options(overrides: dict) -> dict:
    unknown = set(overrides) - set(TINY_DEFAULTS)
    if unknown:
        raise TypeError(
            f"unknown tiny_hf_llava options {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}"
        )
    o = {**TINY_DEFAULTS, **overrides}
    if isinstance(o["vision_feature_layer"], list):
        o["vision_feature_layer"] = tuple(o["vision_feature_layer"])
    return o


def build_tiny_llava(path: Path, label: str, overrides: dict) -> TinyLlava:
    """A random tiny HF `LlavaForConditionalGeneration` (eval, f32, weights re-initialised by
    `randomize_weights_`), saved with `save_pretrained` (v5 key layout) into `path` with a
    tiny processor, and returned with the reference model kept in memory."""
    from transformers import LlavaForConditionalGeneration

    o = _options(overrides)
    tokenizer = build_tiny_tokenizer()
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_index >= o["vocab_size"]:
        raise ValueError(
            f"vocab_size {o['vocab_size']} must exceed the <image> id {image_token_index}"
        )
    processor = None
    if o["with_processor"]:
        processor = save_tiny_processor(
            path,
            o["image_size"],
            o["patch_size"],
            o["vision_feature_select_strategy"],
            tokenizer=tokenizer,
        )
    cfg = hf_llava_config(o, image_token_index)
    torch.manual_seed(o["seed"])
    model = LlavaForConditionalGeneration(cfg)
    randomize_weights_(model, seed=o["seed"], embed_std=0.2 if o["tie_word_embeddings"] else 1.0)
    model = model.to(torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    model.set_attn_implementation("eager")
    patches = (o["image_size"] // o["patch_size"]) ** 2
    return TinyLlava(
        name=label,
        path=path,
        hf=model,
        options=o,
        image_token_index=image_token_index,
        tokens_per_image=patches + (o["vision_feature_select_strategy"] == "full"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        processor=processor,
    )


def options_key(overrides: dict) -> tuple:
    """The cache key of a tiny model: its full option set."""
    return tuple(sorted(_options(overrides).items()))
