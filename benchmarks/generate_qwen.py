"""Qwen2.5-VL generation benchmark: zspa_jax vs transformers (PyTorch), side by side.

    python benchmarks/generate_qwen.py            # -> benchmarks/results/generate_qwen.{md,json}
    python benchmarks/generate_qwen.py --quick    # 448x448 only, one repeat; prints only

Model: Qwen2.5-VL-3B-shaped with random f32 weights and FEWER LAYERS so it runs on a
2-core CPU: the real vision widths (d 1280, m 3420, 16 heads, patch 14, window 112) with
4 of 32 blocks (full attention at blocks 1 and 3), the real merger, and the real Qwen2
widths of the 3B model (d 2048, m 11008, 16 heads / 2 KV heads, vocab 151936, tied head,
M-RoPE [16, 24, 24]) with 2 of 36 layers. Real Qwen2-VL image processor defaults. Images:
448x448 (256 visual tokens) and 1344x1008 (resized by the processor to 1148x840: 1230).

Per image and keep K in {all, 256, 128, 64} (those <= N), B = 1, 8 new tokens, EOS off:
  zspa_jax   generate(input_ids, pixel_values, image_grid_thw, prune=K): prefill seconds
             (tower + merger + pruning + LLM prefill, one jitted program) and decode tok/s
             from its stats, after a warm-up call (compile time reported separately).
  torch      vision: hf.model.get_image_features; LLM prefill on the (pruned) prompt:
             hf(inputs_embeds=..., position_ids=<kept tokens' original 3-D positions>,
             logits_to_keep=1); unpruned only: hf.generate(max_new_tokens=8) end to end.
Timings are medians over --repeats, the frameworks' calls interleaved.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import zspa_jax  # noqa: E402
from zspa_jax import generation  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
NEW_TOKENS = 8
IMAGES = ((448, 448), (1344, 1008))


def build_model(directory: Path):
    """Save the Qwen2.5-VL-3B-shaped random model + a word-level tokenizer + the default
    Qwen2-VL image processor to `directory`; return (hf model, processor)."""
    from tests.qwen2_5_vl_helpers import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, randomize_
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3]),
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
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
        check = ProcessorMixin.check_argument_for_proper_class  # no torchvision: see tests/qwen2_5_vl_helpers
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)
        try:
            processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=None, chat_template=CHAT_TEMPLATE)
        finally:
            ProcessorMixin.check_argument_for_proper_class = check
    model.set_attn_implementation("eager")
    return model, processor


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "generate_qwen"))
    args = parser.parse_args(argv)
    torch.set_num_threads(CORES)
    images = IMAGES[:1] if args.quick else IMAGES
    repeats = 1 if args.quick else args.repeats
    from tests.qwen2_5_vl_helpers import hf_inputs, random_image

    work = Path(tempfile.mkdtemp(prefix="zspa_qwen_bench_"))
    hf, processor = build_model(work / "hf")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convert.qwen2_5_vl", str(work / "hf"), str(work / "jax"), "--quiet"],
                   cwd=ROOT, check=True)
    convert_seconds = time.perf_counter() - t0
    vlm = zspa_jax.load(work / "jax")
    rows = []
    for hw in images:
        batch = hf_inputs(processor, [("describe the picture in detail", 1)], [random_image(*hw, seed=1)])
        a = {k: v.numpy() for k, v in batch.items()}
        n = int((a["input_ids"] == hf.config.image_token_id).sum())
        grid = a["image_grid_thw"][0].tolist()
        with torch.no_grad():
            t_vision, feats = timed(lambda: hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output, repeats)
            embeds = hf.model.get_input_embeddings()(batch["input_ids"])
            image = batch["input_ids"] == hf.config.image_token_id
            embeds[image] = torch.cat(feats)
            positions, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                   image_grid_thw=batch["image_grid_thw"])
            t_generate, _ = timed(lambda: hf.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                      do_sample=False), repeats)
        for keep in dict.fromkeys(k for k in (n, 256, 128, 64) if k <= n):
            prune = None if keep == n else zspa_jax.PruneConfig(keep=keep)
            call = lambda: zspa_jax.generate(vlm, input_ids=a["input_ids"], pixel_values=a["pixel_values"],  # noqa: E731
                                             image_grid_thw=a["image_grid_thw"], prune=prune,
                                             max_new_tokens=NEW_TOKENS, eos_token_id=[])  # [] never stops early
            t0 = time.perf_counter()
            first = call()
            first_seconds = time.perf_counter() - t0
            before = dict(generation.TRACE_COUNTS)
            results = [call() for _ in range(repeats)]
            assert dict(generation.TRACE_COUNTS) == before, "repeated calls recompiled"
            prefill = statistics.median(r.stats["prefill_seconds"] for r in results)
            decode = statistics.median(r.stats["decode_tokens_per_second_total"] for r in results)
            kept = results[-1].kept_indices
            span = torch.nonzero(image[0])[:, 0]
            s0 = int(span[0])
            src = torch.arange(batch["input_ids"].shape[1]) if prune is None else torch.cat(
                [torch.arange(s0), s0 + torch.as_tensor(np.array(kept[0])), torch.arange(s0 + n, batch["input_ids"].shape[1])])
            with torch.no_grad():
                t_prefill, _ = timed(lambda: hf(inputs_embeds=embeds[:, src], position_ids=positions[:, :, src],
                                                logits_to_keep=1), repeats)
            row = {
                "image": f"{hw[0]}x{hw[1]}", "grid": grid, "visual_tokens": n, "keep": keep,
                "sequence_length": int(batch["input_ids"].shape[1] - n + keep),
                "jax_first_call_seconds": first_seconds, "jax_prefill_seconds": prefill,
                "jax_decode_tokens_per_second": decode,
                "torch_vision_seconds": t_vision, "torch_llm_prefill_seconds": t_prefill,
                "torch_prefill_seconds": t_vision + t_prefill,
                "torch_generate_seconds_unpruned": t_generate if prune is None else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()} CPU x{CORES}, jax {jax.__version__}, torch {torch.__version__}"
    lines = [
        f"Qwen2.5-VL-3B-shaped, 4/32 vision blocks, 2/36 LLM layers, random f32 weights; {machine}; "
        f"B=1, {NEW_TOKENS} new tokens; conversion {convert_seconds:.1f} s.",
        "",
        "| image | grid | N | keep | L' | zspa_jax prefill s (tower+prune+LLM) | torch vision s + LLM prefill s "
        "| prefill ratio torch/jax | zspa_jax decode tok/s | torch generate s (unpruned) | zspa_jax first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gen = f"{r['torch_generate_seconds_unpruned']:.2f}" if r["torch_generate_seconds_unpruned"] else "-"
        lines.append(
            f"| {r['image']} | {r['grid'][1]}x{r['grid'][2]} | {r['visual_tokens']} | {r['keep']} | {r['sequence_length']} "
            f"| {r['jax_prefill_seconds']:.2f} | {r['torch_vision_seconds']:.2f} + {r['torch_llm_prefill_seconds']:.2f} "
            f"| {r['torch_prefill_seconds'] / r['jax_prefill_seconds']:.2f}x | {r['jax_decode_tokens_per_second']:.1f} "
            f"| {gen} | {r['jax_first_call_seconds']:.1f} |"
        )
    print("\n".join(lines))
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
