"""Tiny random HF Qwen2.5-VL models built offline, with a word-level tokenizer carrying
the Qwen special tokens, a chat template and a PIL Qwen2-VL image processor.

Sizes: patch 4, merge 2 (one merged token = 8 x 8 pixels), window 16 px = 2 merged
tokens per side, so grids of odd merged height/width leave partial windows.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.support.paths import REPO_ROOT

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = (
    "user assistant system what is shown in this image picture describe the a an of on and cat dog red blue green "
    "small large sitting table two three how many are there photo with it yes no left right top bottom color"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH = 4
MERGE = 2
FACTOR = PATCH * MERGE  # pixels per merged token side


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok.to_str()


def build_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")
            ]
        }
    )
    return tok


def video_processor_config(min_pixels: int = 16 * 16, max_pixels: int = 64 * 64) -> dict:
    """What transformers' `Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
    size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained` writes
    (video_preprocessor_config.json), written by hand: the class needs torchvision."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "max_frames": 768,
        "max_video_tokens": 128000,
        "merge_size": MERGE,
        "min_frames": 4,
        "patch_size": PATCH,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "return_metadata": False,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }


def build_processor(directory: Path, min_pixels: int = 16 * 16, max_pixels: int = 64 * 64):
    """A Qwen2_5_VLProcessor (word-level tokenizer + PIL Qwen2VLImageProcessor) whose
    tokenizer (chat template included), image processor and video processor files are saved
    to `directory`.

    Without torchvision, transformers cannot resolve the video-processor base class and
    refuses to construct the processor; its class check is relaxed here (its video
    processor is None: transformers' video path needs torchvision; the video processor's
    config is saved for zspa_jax's own frame processing).
    """
    import json

    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=2,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )
        tokenizer = build_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(directory)
        image_processor.save_pretrained(directory)
        (Path(directory) / "video_preprocessor_config.json").write_text(
            json.dumps(video_processor_config(min_pixels, max_pixels), indent=2) + "\n"
        )
        check = ProcessorMixin.check_argument_for_proper_class
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)
        try:
            return Qwen2_5_VLProcessor(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=CHAT_TEMPLATE,
            )
        finally:
            ProcessorMixin.check_argument_for_proper_class = check


DEFAULTS: dict[str, Any] = dict(
    depth=4,
    vision_hidden=32,
    vision_intermediate=48,
    vision_heads=2,
    window_size=16,  # 16 px / patch 4 / merge 2 = 2 merged tokens per window side
    fullatt_block_indexes=(0, 3),
    hidden_size=64,
    intermediate_size=96,
    text_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=(2, 3, 3),
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    seed=0,
)


@dataclasses.dataclass
class TinyQwen:
    name: str
    path: Path
    hf: Any  # Qwen2_5_VLForConditionalGeneration, eval, f32, eager attention
    processor: Any
    options: dict

    @property
    def config(self):
        return self.hf.config

    @property
    def image_token_id(self) -> int:
        return self.hf.config.image_token_id


def hf_config(o: dict, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=o["depth"],
            hidden_size=o["vision_hidden"],
            intermediate_size=o["vision_intermediate"],
            num_heads=o["vision_heads"],
            out_hidden_size=o["hidden_size"],
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            window_size=o["window_size"],
            fullatt_block_indexes=list(o["fullatt_block_indexes"]),
        ),
        text_config=dict(
            vocab_size=len(tokenizer) + 6,
            hidden_size=o["hidden_size"],
            intermediate_size=o["intermediate_size"],
            num_hidden_layers=o["text_layers"],
            num_attention_heads=o["num_attention_heads"],
            num_key_value_heads=o["num_key_value_heads"],
            rms_norm_eps=o["rms_norm_eps"],
            max_position_embeddings=o["max_position_embeddings"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": o["rope_theta"],
                "mrope_section": list(o["mrope_section"]),
            },
            tie_word_embeddings=o["tie_word_embeddings"],
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=o["tie_word_embeddings"],
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    """Weights large enough that bugs show (HF's init is std 0.02 with unit norms).

    Norm scales ~ U(0.5, 1.5); biases ~ N(0, 0.1^2); matrices ~ N(0, 1 / fan_in) so
    activations stay O(1) at any width; embeddings ~ N(0, embed_std^2).
    """
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "norm" in name or "ln_q" in name:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in**0.5))


def build(directory: Path, name: str = "tiny", **overrides) -> TinyQwen:
    from transformers import Qwen2_5_VLForConditionalGeneration

    o = {**DEFAULTS, **overrides}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor = build_processor(directory)
    cfg = hf_config(o, processor.tokenizer)
    torch.manual_seed(o["seed"])
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    randomize_(model, o["seed"], embed_std=0.3 if o["tie_word_embeddings"] else 1.0)
    model = model.to(torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    model.set_attn_implementation("eager")
    return TinyQwen(name=name, path=directory, hf=model, processor=processor, options=o)


def convert_cli(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run `python -m convert.qwen2_5_vl SRC OUT *extra` in a subprocess (offline)."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "convert.qwen2_5_vl", str(src), str(out), "--quiet", *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: a moving pattern plus noise (every frame differs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for f in range(frames):
        base = np.stack(
            [127 + 100 * np.sin((yy + 3 * f) / 5.0 + c + xx / 7.0) for c in range(3)], -1
        )
        out.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255))
    return np.asarray(out, np.uint8)


def hf_inputs(processor, prompts, images):
    """Processor output as torch tensors (with mm_token_type_ids, which M-RoPE needs)."""
    texts = [
        processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [*([{"type": "image"}] * n_img), {"type": "text", "text": p}],
                }
            ],
            add_generation_prompt=True,
        )
        for p, n_img in prompts
    ]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    if "mm_token_type_ids" not in batch:
        raise AssertionError("the processor did not return mm_token_type_ids")
    return batch


def hf_greedy_from_pruned(
    hf, embeds, positions, slots_mask, kept, eos_ids, steps: int
) -> list[int]:
    """transformers' greedy tokens for one row given as pruned inputs_embeds: the row's
    non-placeholder tokens and its kept placeholders (`kept` indexes the placeholders of
    `slots_mask` [L] in order) at their original M-RoPE positions (`positions` [3, 1, L]
    from get_rope_index), decoding at the unpruned maximum + 1, + 2, ...; no KV cache (the
    whole sequence each step, positions written explicitly). embeds: [1, L, D]."""
    src = torch.sort(
        torch.cat(
            [
                torch.nonzero(~slots_mask)[:, 0],
                torch.nonzero(slots_mask)[:, 0][torch.as_tensor(np.asarray(kept))],
            ]
        )
    ).values
    x, pos, next_pos = embeds[0, src][None], positions[:, 0, src][:, None], int(positions.max()) + 1
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            tok = int(torch.argmax(hf(inputs_embeds=x, position_ids=pos).logits[0, -1]))
            tokens.append(tok)
            if tok in eos_ids:
                break
            x = torch.cat([x, hf.model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), next_pos)], dim=2)
            next_pos += 1
    return tokens


# ----------------------------------------------------------------------------- session caches
# Plain caches (not fixtures) so every Qwen test module shares one build per option set.

_BUILT: dict[tuple, TinyQwen] = {}
_CONVERTED: dict[tuple, Path] = {}
_TEMP_DIRS: list[Path] = []


def _temp_dir(prefix: str) -> Path:
    """A temp dir removed when the test process exits."""
    import atexit
    import shutil
    import tempfile

    if not _TEMP_DIRS:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TEMP_DIRS])
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _TEMP_DIRS.append(path)
    return path


def tiny_model(**overrides) -> TinyQwen:
    """The tiny HF model for `overrides` (built once per process, in a temp dir)."""
    key = tuple(sorted({**DEFAULTS, **overrides}.items()))
    if key not in _BUILT:
        directory = _temp_dir("zspa_qwen_hf_")
        _BUILT[key] = build(directory, name=f"qwen{len(_BUILT)}", **overrides)
    return _BUILT[key]


def converted(tiny: TinyQwen, *extra: str) -> Path:
    """`python -m convert.qwen2_5_vl tiny.path OUT *extra` run in this process (the CLI's
    `main`), once per process; fails loudly. `convert_cli` is the real subprocess."""
    from tests.support.converter import run_converter_in_process

    key = (str(tiny.path), extra)
    if key not in _CONVERTED:
        out = _temp_dir("zspa_qwen_conv_") / "out"
        proc = run_converter_in_process("qwen2_5_vl", tiny.path, out, *extra)
        if proc.returncode != 0:
            raise AssertionError(
                f"converter failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        _CONVERTED[key] = out
    return _CONVERTED[key]


def hf_pruned_row_logits(tiny, batch, row, kept, tokens=None):
    """HF fed the pruned inputs_embeds of one row with its kept tokens' original 3-D positions
    (`kept` index the row's placeholders in reading order; `tokens` [K, D]: merged tokens
    written at the kept slots first)."""
    hf = tiny.hf
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
        feats = hf.model.get_image_features(batch["pixel_values"], grid).pooler_output
        image = ids == tiny.image_token_id
        embeds[image] = torch.cat(feats)
        positions, _ = hf.model.get_rope_index(
            ids,
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=grid,
            attention_mask=mask,
        )
        slots = torch.nonzero(image[row])[
            :, 0
        ]  # the row's placeholders, its images in reading order
        kept_slots = slots[torch.as_tensor(np.array(kept))]
        if tokens is not None:
            embeds[row, kept_slots] = tokens
        others = torch.nonzero(~image[row])[:, 0]
        src = torch.sort(torch.cat([others, kept_slots])).values
        logits = (
            hf(
                inputs_embeds=embeds[row, src][None],
                position_ids=positions[:, row, src][:, None],
                attention_mask=mask[row, src][None],
            )
            .logits[0]
            .numpy()
        )
    return logits, mask[row, src].numpy().astype(bool), feats, embeds
