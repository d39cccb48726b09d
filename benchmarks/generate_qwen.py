"""Qwen2.5-VL generation benchmark: zspa_jax vs transformers (PyTorch), side by side.

    python benchmarks/generate_qwen.py            # -> benchmarks/results/generate_qwen.{md,json}
    python benchmarks/generate_qwen.py --quick    # 448x448 only, one repeat; prints only
    python benchmarks/generate_qwen.py --quick --no-images --video 16x112x112   # a small clip only (a smoke run)
    python benchmarks/generate_qwen.py --sizes 448x448,896x672,1344x1008 --keeps all,64 --video none

Model: Qwen2.5-VL-3B-shaped with random f32 weights at the REAL PROPORTIONS of the 3B
model, a quarter of its depth so it runs on a 2-core CPU: the real vision widths (d 1280,
m 3420, 16 heads, patch 14, window 112) with 8 of 32 blocks (full attention at block 7:
one block in eight, as in the real 3B's 7/15/23/31), the real merger, and the real Qwen2
widths of the 3B model (d 2048, m 11008, 16 heads / 2 KV heads, vocab 151936, tied head,
M-RoPE [16, 24, 24]) with 9 of 36 layers. Tower and LLM therefore keep the real model's
share of the prefill, and `zspa_jax.estimate` on this config predicts the same FLOP
ratios as on the real 3B. Real Qwen2-VL image processor defaults. Images: 448x448 (256
visual tokens), 896x672 (912) and 1344x1008 (resized by the processor to 1148x840: 1230).

Per image and keep K in {all, 256, 128, 64} (those <= N), B = 1, 8 new tokens, EOS off:
  zspa_jax   generate(input_ids, pixel_values, image_grid_thw, prune=K): prefill seconds
             (tower + merger + pruning + LLM prefill, one jitted program) and decode tok/s
             from its stats, after a warm-up call (compile time reported separately).
  zspa_jax   tower: the tower + merger alone, jitted on generate's bucketed layout (its patch slots);
  torch      vision: hf.model.get_image_features; LLM prefill on the (pruned) prompt:
             hf(inputs_embeds=..., position_ids=<kept tokens' original 3-D positions>,
             logits_to_keep=1); unpruned only: hf.generate(max_new_tokens=8) end to end.
             transformers' default attention ("sdpa": PyTorch's fused CPU kernels) in every
             column; the unpruned rows also time vision + LLM prefill with "eager" attention.
A video row (--video FRAMESxHxW, default 16x448x448: 8 temporal patches of 32x32 patches,
2048 visual tokens; the clip at 2 fps) at keep {all, N/8, N/16} over the clip's tokens:
  zspa_jax   generate(input_ids, pixel_values_videos, video_grid_thw, second_per_grid_ts,
             prune=K): prefill seconds (tower + merger + pruning + LLM prefill and the first
             token, one program), decode tok/s and the KV cache it allocates (cache slots:
             the bucketed prompt + new tokens);
  torch      vision: get_video_features; first token: the LLM prefill on the (pruned) prompt
             at the kept tokens' original 3-D positions (get_rope_index with the clip's
             second_per_grid_ts) and its argmax; KV cache: the bytes of that prefill's cache.
The clip's arrays come from zspa_jax.encode (transformers' video processor needs torchvision;
tests/test_qwen2_5_vl_video.py checks the two agree).
Timings are medians over --repeats after a warm-up call of each, every timed call of an
image (or the clip) taken in turns, one of each per round, so a slower spell of a shared
machine hits both frameworks' columns alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import zspa_jax  # noqa: E402
from zspa_jax import generation  # noqa: E402
from zspa_jax.estimate import estimate_model  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
NEW_TOKENS = 8
IMAGES = ((448, 448), (896, 672), (1344, 1008))
VISION_DEPTH, FULL_ATTENTION, LLM_LAYERS = (
    8,
    (7,),
    9,
)  # a quarter of the 3B's 32 / (7, 15, 23, 31) / 36
VIDEO_FPS = 2.0
# transformers' Qwen2VLVideoProcessor defaults (class attributes), saved as video_preprocessor_config.json
VIDEO_PROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_sample_frames": False,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_frames": 768,
    "min_frames": 4,
    "merge_size": 2,
    "patch_size": 14,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 28 * 28 * 768, "shortest_edge": 128 * 28 * 28},
    "temporal_patch_size": 2,
    "video_processor_type": "Qwen2VLVideoProcessor",
}


def round_robin(calls: dict[str, Any], repeats: int) -> dict[str, tuple[list[float], list[Any]]]:
    """name -> (wall seconds, outputs) of `repeats` calls of each function, taken in turns
    (one call of each per round), so that a slower spell of this shared machine hits every
    column alike. The calls are warm: compile before."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    outs: dict[str, list[Any]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            outs[name].append(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: (times[name], outs[name]) for name in calls}


def first_call(call) -> tuple[float, Any]:
    """(seconds, result) of a zspa_jax generate call that compiles."""
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result


def generate_stats(results) -> tuple[float, float]:
    """(median prefill s, median decode tok/s) from zspa_jax GenerateResults' own stats."""
    return (
        statistics.median(r.stats["prefill_seconds"] for r in results),
        statistics.median(r.stats["decode_tokens_per_second_total"] for r in results),
    )


def jax_tower(vlm, a: dict) -> tuple[Any, int]:
    """(a warm call, patch slots) of zspa_jax's tower + merger alone: one jitted program on
    the bucketed layout generate lays out for these arrays."""
    from flax import nnx

    from zspa_jax.batch import prepare_arrays

    host = prepare_arrays(
        vlm,
        a["input_ids"],
        a["pixel_values"],
        a["attention_mask"],
        {"image_grid_thw": a["image_grid_thw"]},
        None,
        extra_length=NEW_TOKENS,
        bucket=True,
        prompt_bucket=generation.prompt_bucket,
    )
    tower = jax.jit(
        lambda state, pixels, layout: nnx.merge(vlm.graphdef, state).image_features(pixels, layout)
    )
    run = lambda: jax.block_until_ready(tower(vlm.state, host.pixel_values, host.aux.layout))  # noqa: E731
    run()
    return run, int(host.aux.layout.order.size)


def build_model(directory: Path):
    """Save the Qwen2.5-VL-3B-shaped random model + a word-level tokenizer + the default
    Qwen2-VL image processor to `directory`; return (hf model, processor)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    from tests.support.tiny_qwen2_5_vl import (
        CHAT_TEMPLATE,
        SPECIAL_TOKENS,
        build_tokenizer,
        randomize_,
    )

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=VISION_DEPTH,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(FULL_ATTENTION),
        ),
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=LLM_LAYERS,
            num_attention_heads=16,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    randomize_(model, 0, embed_std=0.05)
    model = model.float().eval()
    image_processor = Qwen2VLImageProcessorPil()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        image_processor.save_pretrained(directory)
        (directory / "video_preprocessor_config.json").write_text(
            json.dumps(VIDEO_PROCESSOR, indent=2) + "\n"
        )
        check = (
            ProcessorMixin.check_argument_for_proper_class
        )  # no torchvision: see tests/support/tiny_qwen2_5_vl
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)
        try:
            processor = Qwen2_5_VLProcessor(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=CHAT_TEMPLATE,
            )
        finally:
            ProcessorMixin.check_argument_for_proper_class = check
    model.set_attn_implementation("sdpa")  # transformers' default
    return model, processor


def matmul_gflops() -> float:
    """The machine's f32 matmul rate (jax, 1024 x 1024 x 1024, median of 20): the ceiling
    both frameworks' matmul-bound work runs against."""
    a = jax.numpy.ones((1024, 1024), jax.numpy.float32)
    square = jax.jit(lambda a: a @ a)
    seconds, _ = timed(lambda: jax.block_until_ready(square(a)), 21)
    return 2 * 1024**3 / seconds / 1e9


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def torch_cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return int(
            sum(t.nbytes for layer in layers for t in (layer.keys, layer.values) if t is not None)
        )
    return int(sum(t.nbytes for t in list(cache.key_cache) + list(cache.value_cache)))


def video_rows(hf, vlm, size: tuple[int, int, int], repeats: int) -> list[dict]:
    """The clip at keep all, N/8, N/16: zspa_jax's generate against transformers' tower and
    LLM prefill on the (pruned) prompt at the kept tokens' 3-D positions."""
    from tests.support.tiny_qwen2_5_vl import random_clip as clip

    frames, height, width = size
    video = zspa_jax.Video(clip(frames, height, width, seed=1), fps=VIDEO_FPS)
    a = zspa_jax.encode(vlm, ["describe the clip in detail"], videos=[video])
    cfg = hf.config
    ids = torch.as_tensor(a["input_ids"]).long()
    mm = torch.where(ids == cfg.video_token_id, 2, torch.where(ids == cfg.image_token_id, 1, 0))
    grid = torch.as_tensor(a["video_grid_thw"])
    n = int((ids == cfg.video_token_id).sum())
    pixels = torch.as_tensor(a["pixel_values_videos"])
    vision = lambda: hf.model.get_video_features(pixels, grid).pooler_output  # noqa: E731
    with torch.no_grad():
        feats = vision()
        embeds = hf.model.get_input_embeddings()(ids)
        video_slots = ids == cfg.video_token_id
        embeds[video_slots] = torch.cat(feats)
        positions, _ = hf.model.get_rope_index(
            ids,
            mm_token_type_ids=mm,
            video_grid_thw=grid,
            second_per_grid_ts=torch.as_tensor(a["second_per_grid_ts"]),
        )
    calls, firsts, keeps = (
        {"torch vision": vision},
        {},
        list(dict.fromkeys((n, max(1, n // 8), max(1, n // 16)))),
    )
    for keep in keeps:
        prune = None if keep == n else zspa_jax.PruneConfig(keep=keep)
        call = partial(
            zspa_jax.generate,
            vlm,
            input_ids=a["input_ids"],
            attention_mask=a["attention_mask"],
            pixel_values_videos=a["pixel_values_videos"],
            video_grid_thw=a["video_grid_thw"],
            second_per_grid_ts=a["second_per_grid_ts"],
            prune=prune,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=[],
        )
        firsts[keep] = first_call(call)
        kept = firsts[keep][1].kept_indices
        span = torch.nonzero(video_slots[0])[:, 0]
        src = (
            torch.arange(ids.shape[1])
            if prune is None
            else torch.sort(
                torch.cat(
                    [torch.nonzero(~video_slots[0])[:, 0], span[torch.as_tensor(np.array(kept[0]))]]
                )
            ).values
        )
        calls[f"jax {keep}"] = call
        calls[f"torch prefill {keep}"] = partial(
            hf,
            inputs_embeds=embeds[:, src],
            position_ids=positions[:, :, src],
            logits_to_keep=1,
            use_cache=True,
        )
    with torch.no_grad():
        for name in calls:  # warm-up (generate and vision have run once already)
            if name.startswith("torch prefill"):
                calls[name]()
        before = dict(generation.TRACE_COUNTS)
        timing = round_robin(calls, repeats)
    assert dict(generation.TRACE_COUNTS) == before, "repeated calls recompiled"
    t_vision = statistics.median(timing["torch vision"][0])
    rows = []
    for keep in keeps:
        prefill, decode = generate_stats(timing[f"jax {keep}"][1])
        last = timing[f"jax {keep}"][1][-1]
        t_prefill = statistics.median(timing[f"torch prefill {keep}"][0])
        row = {
            "video": f"{frames}x{height}x{width}",
            "fps": VIDEO_FPS,
            "grid": a["video_grid_thw"][0].tolist(),
            "visual_tokens": n,
            "keep": keep,
            "sequence_length": int(ids.shape[1] - n + keep),
            "jax_first_call_seconds": firsts[keep][0],
            "jax_prefill_seconds": prefill,
            "jax_decode_tokens_per_second": decode,
            "jax_kv_cache_bytes": last.stats["kv_cache_bytes"],
            "jax_cache_length": last.stats["cache_length"],
            "torch_vision_seconds": t_vision,
            "torch_llm_prefill_seconds": t_prefill,
            "torch_first_token_seconds": t_vision + t_prefill,
            "torch_kv_cache_bytes": torch_cache_bytes(
                timing[f"torch prefill {keep}"][1][-1].past_key_values
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def video_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "| video | grid (t x h x w) | N | keep | L' | zspa_jax prefill + first token s | torch vision s + LLM prefill s "
        "| ratio torch/jax | zspa_jax KV MiB (slots) | torch KV MiB (prompt) | zspa_jax decode tok/s | zspa_jax first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, h, w = r["grid"]
        lines.append(
            f"| {r['video']} @ {r['fps']:g} fps | {t}x{h}x{w} | {r['visual_tokens']} | {r['keep']} | {r['sequence_length']} "
            f"| {r['jax_prefill_seconds']:.2f} | {r['torch_vision_seconds']:.2f} + {r['torch_llm_prefill_seconds']:.2f} "
            f"| {r['torch_first_token_seconds'] / r['jax_prefill_seconds']:.2f}x "
            f"| {r['jax_kv_cache_bytes'] / 2**20:.1f} ({r['jax_cache_length']}) | {r['torch_kv_cache_bytes'] / 2**20:.1f} "
            f"| {r['jax_decode_tokens_per_second']:.1f} | {r['jax_first_call_seconds']:.1f} |"
        )
    return lines


def image_table(rows: list[dict]) -> list[str]:
    """One line per image and keep: both frameworks' prefill, their ratio, and each pruned
    prefill's speed-up over its unpruned one next to the FLOP ratio `estimate` predicts."""
    lines = [
        "| image | grid | N | keep | L' | zspa_jax prefill s (tower+prune+LLM) | torch vision s + LLM prefill s "
        "| prefill ratio torch/jax | tower s jax / torch (jax slots) | pruning speed-up zspa_jax / torch "
        "| estimate FLOP ratio | zspa_jax decode tok/s | torch generate s (unpruned) | torch eager vision + LLM s (ratio) "
        "| zspa_jax first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    unpruned = {r["image"]: r for r in rows if r["keep"] == r["visual_tokens"]}
    for r in rows:
        base = unpruned[r["image"]]
        jax_speedup = base["jax_prefill_seconds"] / r["jax_prefill_seconds"]
        torch_speedup = base["torch_prefill_seconds"] / r["torch_prefill_seconds"]
        predicted = r["estimate_prefill_flops_unpruned"] / r["estimate_prefill_flops"]
        off = " (>15% off)" if abs(jax_speedup / predicted - 1) > 0.15 else ""
        gen = (
            f"{r['torch_generate_seconds_unpruned']:.2f}"
            if r["torch_generate_seconds_unpruned"]
            else "-"
        )
        eager = r.get("torch_eager_prefill_seconds_unpruned")
        eager = f"{eager:.2f} ({eager / r['jax_prefill_seconds']:.2f}x)" if eager else "-"
        lines.append(
            f"| {r['image']} | {r['grid'][1]}x{r['grid'][2]} | {r['visual_tokens']} | {r['keep']} | {r['sequence_length']} "
            f"| {r['jax_prefill_seconds']:.2f} | {r['torch_vision_seconds']:.2f} + {r['torch_llm_prefill_seconds']:.2f} "
            f"| {r['torch_prefill_seconds'] / r['jax_prefill_seconds']:.2f}x "
            f"| {r['jax_tower_seconds']:.2f} / {r['torch_vision_seconds']:.2f} ({r['jax_tower_slots']}) "
            f"| {jax_speedup:.2f}x / {torch_speedup:.2f}x "
            f"| {predicted:.2f}x{off} | {r['jax_decode_tokens_per_second']:.1f} | {gen} | {eager} "
            f"| {r['jax_first_call_seconds']:.1f} |"
        )
    return lines


def image_rows(
    hf, processor, vlm, hw: tuple[int, int], keeps: list[int | None], repeats: int
) -> list[dict]:
    """The image at each keep (None: unpruned): zspa_jax's generate and tower against
    transformers' vision and LLM prefill (sdpa), generate and eager attention, all timed in
    turns (`round_robin`) after every program has compiled."""
    from tests.support.tiny_qwen2_5_vl import hf_inputs, random_image

    batch = hf_inputs(
        processor, [("describe the picture in detail", 1)], [random_image(*hw, seed=1)]
    )
    a = {k: v.numpy() for k, v in batch.items()}
    ids = batch["input_ids"]
    n = int((a["input_ids"] == hf.config.image_token_id).sum())
    vision = lambda: (
        hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    )  # noqa: E731
    with torch.no_grad():
        feats = vision()
        embeds = hf.model.get_input_embeddings()(ids)
        image = ids == hf.config.image_token_id
        embeds[image] = torch.cat(feats)
        positions, _ = hf.model.get_rope_index(
            ids,
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
        )

    def eager():  # transformers' eager attention: vision + LLM prefill
        hf.set_attn_implementation("eager")
        try:
            vision()
            return hf(inputs_embeds=embeds, position_ids=positions, logits_to_keep=1)
        finally:
            hf.set_attn_implementation("sdpa")

    tower, tower_slots = jax_tower(vlm, a)
    calls = {
        "torch vision": vision,
        "torch generate": partial(
            hf.generate,
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        ),
        "torch eager": eager,
        "jax tower": tower,
    }
    keeps = list(dict.fromkeys(n if k is None else k for k in keeps if k is None or k <= n))
    firsts, span = {}, torch.nonzero(image[0])[:, 0]
    for keep in keeps:
        prune = None if keep == n else zspa_jax.PruneConfig(keep=keep)
        call = partial(
            zspa_jax.generate,
            vlm,
            input_ids=a["input_ids"],
            pixel_values=a["pixel_values"],
            image_grid_thw=a["image_grid_thw"],
            prune=prune,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=[],
        )  # [] never stops early
        firsts[keep] = first_call(call)
        s0, length = int(span[0]), ids.shape[1]
        src = (
            torch.arange(length)
            if prune is None
            else torch.cat(
                [
                    torch.arange(s0),
                    s0 + torch.as_tensor(np.array(firsts[keep][1].kept_indices[0])),
                    torch.arange(s0 + n, length),
                ]
            )
        )
        calls[f"jax {keep}"] = call
        calls[f"torch prefill {keep}"] = partial(
            hf, inputs_embeds=embeds[:, src], position_ids=positions[:, :, src], logits_to_keep=1
        )
    with torch.no_grad():
        for name in calls:  # warm-up (the tower, generate and vision have run once already)
            if name.startswith("torch") and name != "torch vision":
                calls[name]()
        before = dict(generation.TRACE_COUNTS)
        timing = round_robin(calls, repeats)
    assert dict(generation.TRACE_COUNTS) == before, "repeated calls recompiled"
    median = {name: statistics.median(t) for name, (t, _) in timing.items()}
    text_tokens = int(ids.shape[1]) - n
    rows = []
    for keep in keeps:
        prefill, decode = generate_stats(timing[f"jax {keep}"][1])
        flops = estimate_model(vlm.config, text_tokens, hw, zspa_jax.PruneConfig(keep=keep))
        unpruned = keep == n
        row = {
            "image": f"{hw[0]}x{hw[1]}",
            "grid": a["image_grid_thw"][0].tolist(),
            "visual_tokens": n,
            "keep": keep,
            "estimate_prefill_flops": flops["prefill_flops_total"],
            "estimate_prefill_flops_unpruned": flops["prefill_flops_total_unpruned"],
            "sequence_length": int(ids.shape[1] - n + keep),
            "jax_first_call_seconds": firsts[keep][0],
            "jax_prefill_seconds": prefill,
            "jax_decode_tokens_per_second": decode,
            "jax_tower_seconds": median["jax tower"],
            "jax_tower_slots": tower_slots,
            "torch_vision_seconds": median["torch vision"],
            "torch_llm_prefill_seconds": median[f"torch prefill {keep}"],
            "torch_prefill_seconds": median["torch vision"] + median[f"torch prefill {keep}"],
            "torch_generate_seconds_unpruned": median["torch generate"] if unpruned else None,
            "torch_eager_prefill_seconds_unpruned": median["torch eager"] if unpruned else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "generate_qwen"))
    parser.add_argument(
        "--video",
        default="16x448x448",
        help="the clip FRAMESxHxW of the video row ('none': no row)",
    )
    parser.add_argument("--no-images", action="store_true", help="only the video row")
    parser.add_argument(
        "--sizes", default=None, help="images HxW,HxW,... (default: 448x448,896x672,1344x1008)"
    )
    parser.add_argument("--keeps", default="all,256,128,64", help="keeps to time ('all': unpruned)")
    args = parser.parse_args(argv)
    sizes = (
        IMAGES
        if args.sizes is None
        else tuple(tuple(int(v) for v in s.split("x")) for s in args.sizes.split(","))
    )
    keeps = [None if k == "all" else int(k) for k in args.keeps.split(",")]
    torch.set_num_threads(CORES)
    images = () if args.no_images else (sizes[:1] if args.quick else sizes)
    video = None if args.video == "none" else tuple(int(v) for v in args.video.lower().split("x"))
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(
        prefix="zspa_qwen_bench_"
    ) as tmp:  # 9 GB of checkpoints, removed after
        work = Path(tmp)
        hf, processor = build_model(work / "hf")
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "convert.qwen2_5_vl",
                str(work / "hf"),
                str(work / "jax"),
                "--quiet",
            ],
            cwd=ROOT,
            check=True,
        )
        convert_seconds = time.perf_counter() - t0
        vlm = zspa_jax.load(work / "jax")
        rows = [row for hw in images for row in image_rows(hf, processor, vlm, hw, keeps, repeats)]
        clips = [] if video is None else video_rows(hf, vlm, video, repeats)
    machine = (
        f"{platform.machine()} CPU x{CORES} (f32 matmul {matmul_gflops():.0f} GFLOP/s), jax {jax.__version__}, "
        f"torch {torch.__version__}"
    )
    lines = [
        f"Qwen2.5-VL-3B-shaped at the 3B's proportions: {VISION_DEPTH}/32 vision blocks (full attention at "
        f"{', '.join(map(str, FULL_ATTENTION))}), {LLM_LAYERS}/36 LLM layers, random f32 weights; {machine}; "
        f"B=1, {NEW_TOKENS} new tokens; conversion {convert_seconds:.1f} s.",
        "",
        *image_table(rows),
    ]
    if clips:
        lines += video_table(clips)
    print("\n".join(lines))
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(
            json.dumps({"machine": machine, "rows": rows, "video_rows": clips}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
