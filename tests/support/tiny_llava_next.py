"""Tiny random LLaVA-NeXT checkpoints for the tests: a transformers model (CLIP 32 px / patch 8
-> 4x4 tokens per crop; 2-layer GQA LLaMA or Mistral; pinpoints [[32, 64], [64, 32],
[64, 64]]) saved with a `LlavaNextProcessor` and converted in-process, cached per process."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convert.llava_next import convert
from models.checkpoint import read_payload, restore_model
from models.llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration
from tests.support.random_weights import randomize_weights_
from tests.support.tokenizers import IMAGE_TOKEN, build_tiny_tokenizer
from zspa_jax.families.llava_next.layout import (
    anyres_grid_shape,
    image_num_patches,
    image_token_count,
)

PINPOINTS = [[32, 64], [64, 32], [64, 64]]
IMAGE_SIZE, PATCH_SIZE = 32, 8
MAX_PATCHES = 5  # 1 + (64 * 64) / 32^2


def hf_llava_next_config(image_token_index: int, text: str = "llama", vision_layers: int = 3):
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig
    from transformers import LlavaNextConfig as HFConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
        projection_dim=32,
    )
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if text == "mistral":
        text_config = MistralConfig(**common, sliding_window=None, rope_theta=10000.0)
    else:
        text_config = LlamaConfig(**common, rope_theta=10000.0)
    return HFConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=image_token_index,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def save_processor(directory: Path, tokenizer):
    from transformers import AutoProcessor, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=PINPOINTS,
        )
        LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token=IMAGE_TOKEN,
        ).save_pretrained(directory)
        return AutoProcessor.from_pretrained(directory)


@dataclasses.dataclass
class Built:
    src: Path  # HF save_pretrained dir (+ processor)
    out: Path  # our conversion
    summary: dict
    hf: Any  # transformers model, eval, f32, eager attention
    processor: Any
    cfg: LlavaNextConfig
    vlm: LlavaNextForConditionalGeneration
    image_token: int
    pad_token: int


def build(tmp: Path, text: str = "llama", seed: int = 0, with_processor: bool = True) -> Built:
    from transformers import LlavaNextForConditionalGeneration as HFModel

    tokenizer = build_tiny_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    src = tmp / "hf"
    src.mkdir()
    processor = save_processor(src, tokenizer) if with_processor else None
    torch.manual_seed(seed)
    hf = HFModel(hf_llava_next_config(image_token, text))
    randomize_weights_(hf, seed=seed)
    with torch.no_grad():  # randomize_weights_ gives it N(0, 0.15^2); make it as large as a token
        generator = torch.Generator().manual_seed(seed)
        hf.model.image_newline.copy_(torch.randn(hf.model.image_newline.shape, generator=generator))
    hf = hf.to(torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(src)
    hf.set_attn_implementation("eager")
    out = tmp / "out"
    summary = convert(src, out, progress=False)
    name, payload = read_payload(out)
    assert name == "llava_next"
    cfg = LlavaNextConfig.from_dict(payload)
    vlm = restore_model(out, cfg, LlavaNextForConditionalGeneration)
    return Built(src, out, summary, hf, processor, cfg, vlm, image_token, tokenizer.pad_token_id)


def random_pixels(sizes, cfg, seed: int) -> np.ndarray:
    """[n, MAX_PATCHES, 3, S, S] noise in the crops each image uses, zeros after (the processor's padding)."""
    rng = np.random.default_rng(seed)
    pv = np.zeros((len(sizes), MAX_PATCHES, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i, size in enumerate(sizes):
        k = image_num_patches(size, cfg)
        pv[i, :k] = rng.standard_normal((k, 3, IMAGE_SIZE, IMAGE_SIZE))
    return pv


_BUILT: dict[str, Built] = {}


def tiny_llava_next(text: str = "llama") -> Built:
    """One build per text backbone per process (temp dirs live until the process ends)."""
    if text not in _BUILT:
        _BUILT[text] = build(Path(tempfile.mkdtemp(prefix=f"zspa_llava_next_{text}_")), text=text)
    return _BUILT[text]


def rows(tiny: Built, plan, seed: int) -> dict:
    """A left-padded batch: plan = [(text before, image sizes, question length)] per row.
    Returns input_ids, attention_mask, pixel_values (random crops) and image_sizes."""
    rng = np.random.default_rng(seed)
    out, sizes = [], []
    for before, images, question in plan:
        parts = [[1], rng.integers(10, 290, before)]
        for size in images:
            parts.append(np.full(image_token_count(size, tiny.cfg), tiny.image_token))
            sizes.append(size)
        parts.append(rng.integers(10, 290, question))
        out.append(np.concatenate(parts).astype(np.int64))
    width = max(map(len, out))
    ids = np.full((len(out), width), tiny.pad_token, np.int64)
    mask = np.zeros((len(out), width), np.int64)
    for i, r in enumerate(out):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    sizes = np.asarray(sizes)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": random_pixels(sizes, tiny.cfg, seed),
        "image_sizes": sizes,
    }


def hf_pieces(tiny: Built, batch: dict):
    """transformers' merged input embeddings [B, L, D] (its own image features written in)
    and its raw embedding rows."""
    hf, ids = tiny.hf, torch.as_tensor(batch["input_ids"])
    with torch.no_grad():
        feats = hf.get_image_features(
            pixel_values=torch.as_tensor(batch["pixel_values"]),
            image_sizes=torch.as_tensor(batch["image_sizes"]),
        ).pooler_output
        raw = hf.get_input_embeddings()(torch.where(ids == tiny.image_token, 0, ids))
        merged = raw.clone()
        merged[ids == tiny.image_token] = torch.cat(list(feats))
    return merged, raw


def hf_row_logits(
    tiny: Built, merged, batch: dict, row: int, kept, keep_positions: bool = False
) -> np.ndarray:
    """transformers on one row alone with only the kept visual slots (None: all), positions
    renumbered or the original ones."""
    ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
    real = np.flatnonzero(mask)
    slots = np.flatnonzero(ids == tiny.image_token)
    src = (
        real if kept is None else np.sort(np.concatenate([np.setdiff1d(real, slots), slots[kept]]))
    )
    positions = (
        np.searchsorted(real, src) if keep_positions or kept is None else np.arange(len(src))
    )
    with torch.no_grad():
        return (
            tiny.hf(
                inputs_embeds=merged[row, src][None], position_ids=torch.as_tensor(positions)[None]
            )
            .logits[0]
            .numpy()
        )


def hf_slot_of(tiny: Built, size) -> Callable[[int, int], int]:
    """(crop, token) -> the image's placeholder slot whose position that tower token takes:
    where transformers' own pack_image_features puts it, or for a token its unpadding cuts
    away, the slot of the kept token nearest in the crop grid (row and column clamped)."""
    hf, side = tiny.hf, tiny.cfg.tokens_per_side
    crops, tokens = image_num_patches(size, tiny.cfg), tiny.cfg.tokens_per_crop
    code = torch.arange(1, crops * tokens + 1, dtype=torch.float32).view(crops, tokens, 1)
    with torch.no_grad():
        packed, _ = hf.model.pack_image_features(
            [code], torch.as_tensor([size]), "default", torch.zeros(1)
        )
    packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed  # one image
    packed = (
        packed[:, 0].long().numpy() - 1
    )  # tower token (crop * P + token) of each slot, -1 newline
    where = {int(v): s for s, v in enumerate(packed) if v >= 0}
    _, cols = anyres_grid_shape(size, tiny.cfg.image_grid_pinpoints, tiny.cfg.crop_size)

    def full(c: int, t: int) -> tuple[int, int]:
        return ((c - 1) // cols) * side + t // side, ((c - 1) % cols) * side + t % side

    inside = [full(v // tokens, v % tokens) for v in where if v >= tokens]
    r_lo, r_hi = min(r for r, _ in inside), max(r for r, _ in inside)
    c_lo, c_hi = min(c for _, c in inside), max(c for _, c in inside)
    at = {full(v // tokens, v % tokens): s for v, s in where.items() if v >= tokens}

    def slot(c: int, t: int) -> int:
        if c == 0:
            return where[t]
        r, col = full(c, t)
        return at[(min(max(r, r_lo), r_hi), min(max(col, c_lo), c_hi))]

    return slot
