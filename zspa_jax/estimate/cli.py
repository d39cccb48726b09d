"""`python -m zspa_jax.estimate`: the FLOPs/KV table of a named model, or its per-device
bytes on a mesh (--mesh). Models come from presets.MODELS; the family's estimate hooks
say how many visual tokens an image becomes. The pruning flags (--keep/--ratio, --method,
one per method option) are `python -m zspa_jax generate`'s (zspa_jax.prune_args): each
row's PruneConfig is built from them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import NamedTuple

from zspa_jax.estimate.model import estimate_model, hooks_of, mesh_bytes
from zspa_jax.estimate.presets import MODELS
from zspa_jax.prune_args import add_prune_arguments, prune_from_args

__all__ = ["FLOPS_TABLES", "main"]


def _image_hw(text: str, parser) -> tuple[int, int]:
    """HxW in pixels, both positive; anything else is one `error:` line (exit 2)."""
    parts = text.lower().split("x")
    if (
        len(parts) != 2
        or not all(p.strip().isdigit() for p in parts)
        or min(int(p) for p in parts) < 1
    ):
        parser.error(
            f"--image must be HxW with positive integer pixel sizes (e.g. 1344x1008), got {text!r}"
        )
    return int(parts[0]), int(parts[1])


def _video_fhw(text: str, parser) -> tuple[int, int, int]:
    """FRAMESxHxW, all positive; anything else is one `error:` line (exit 2)."""
    parts = text.lower().split("x")
    if (
        len(parts) != 3
        or not all(p.strip().isdigit() for p in parts)
        or min(int(p) for p in parts) < 1
    ):
        parser.error(
            f"--video must be FRAMESxHxW with positive integers (e.g. 16x448x448), got {text!r}"
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


def _visual_plan(args, parser, cfg, hooks):
    """(image_hw, video, plan) of the command line: --video when given, else --image."""
    if args.fps is not None and args.video is None:
        parser.error("--fps is the frame rate of --video; give --video FRAMESxHxW")
    if args.video is None:
        hw = _image_hw(args.image, parser) if hooks.image_sized else None
        return hw, None, hooks.image(cfg, hw)
    if hooks.video is None:
        parser.error(f"--video: {args.model} takes no video")
    video = _video_fhw(args.video, parser)
    try:
        return None, video, hooks.video(cfg, video, args.fps)
    except ValueError as e:
        parser.error(f"--video: {e}")


def _video_keeps(n: int) -> list[int]:
    """All of a clip's tokens, then 1/4, 1/8 and 1/16 of them."""
    return list(dict.fromkeys(max(1, round(n / d)) for d in (1, 4, 8, 16)))


def _default_keeps(n: int) -> list[int]:
    return list(dict.fromkeys(k for k in (n, 256, 128, 64) if k <= n))


def _llava_7b_header(args, hw, n: int, rows: list[dict]) -> str:
    w = rows[0]
    return (
        f"LLaVA-1.5-7B (CLIP ViT-L/14-336 -> 2-layer MLP -> LLaMA-2-7B), B=1, {args.text_tokens} text tokens + "
        f"{n} visual tokens, {args.new_tokens} new tokens; FLOPs = 2 x MACs of matrix products, "
        "attention over the full n x n square (not causal-halved).\n"
        f"weights (f16): vision {w['weight_bytes_vision'] / 2**30:.2f} GiB, projector "
        f"{w['weight_bytes_projector'] / 2**20:.0f} MiB, LLM {w['weight_bytes_llm'] / 2**30:.2f} GiB; "
        f"decode reads {w['decode_weight_bytes_per_token'] / 2**30:.2f} GiB of weights per token; "
        f"KV {w['kv_cache_bytes_per_token'] / 2**10:.0f} KiB per token (f16)"
    )


def _qwen_name(model: str) -> str:
    """'qwen2.5-vl-3b' -> 'Qwen2.5-VL-3B'."""
    return "Qwen2.5-VL-" + model.rsplit("-", 1)[1].upper()


def _qwen_header(args, hw, n: int, rows: list[dict]) -> str:
    w = rows[0]
    if "grid_thw" in w:  # a video
        f, vh, vw = w["video_frames_hw"]
        t, gh, gw = w["grid_thw"]
        return (
            f"{_qwen_name(args.model)}, B=1, a video of {f} frames of {vh}x{vw} at {w['fps']:g} fps -> {t} temporal patches of "
            f"{gh}x{gw} patches, {n} visual tokens (K counts over the whole clip), {args.text_tokens} text tokens, "
            f"{args.new_tokens} new tokens (vision GFLOPs: the tower and merger on every temporal patch); "
            f"second_per_grid_ts {w['second_per_grid_ts']:.4g} s, temporal positions span "
            f"{w['temporal_position_span']}; weights (bf16): vision {w['weight_bytes_vision'] / 2**30:.2f} GiB, "
            f"LLM {w['weight_bytes_llm'] / 2**30:.2f} GiB"
        )
    return (
        f"{_qwen_name(args.model)}, B=1, a {hw[0]}x{hw[1]} image -> grid {w['grid_hw'][0]}x{w['grid_hw'][1]} patches, "
        f"{n} visual tokens, {args.text_tokens} text tokens, {args.new_tokens} new tokens (vision GFLOPs include "
        f"the merger); weights (bf16): vision "
        f"{w['weight_bytes_vision'] / 2**30:.2f} GiB, LLM {w['weight_bytes_llm'] / 2**30:.2f} GiB"
    )


def _llava_next_7b_header(args, hw, n: int, rows: list[dict]) -> str:
    w = rows[0]
    return (
        f"LLaVA-NeXT-7B (anyres CLIP ViT-L/14-336 -> 2-layer MLP -> Vicuna-7B), B=1, a {hw[0]}x{hw[1]} image -> "
        f"{w['crops']} crops (base view included), {n} visual tokens (row newlines included), {args.text_tokens} "
        f"text tokens, {args.new_tokens} new tokens (vision GFLOPs include the projector of every crop); weights "
        f"(f16): vision {w['weight_bytes_vision'] / 2**30:.2f} GiB, LLM {w['weight_bytes_llm'] / 2**30:.2f} GiB"
    )


class FlopsTable(NamedTuple):
    """A model the FLOPs table covers (the others go with --mesh)."""

    header: Callable[
        ..., str
    ]  # header(args, image_hw, visual_tokens, rows) -> the lines above the table
    keeps: tuple[int, ...] | None = None  # default keeps (None: N, 256, 128, 64)


FLOPS_TABLES = {
    "llava-1.5-7b": FlopsTable(_llava_7b_header, keeps=(576, 192, 128, 64)),
    "llava-v1.6-7b": FlopsTable(_llava_next_7b_header),
    "qwen2.5-vl-3b": FlopsTable(_qwen_header),
    "qwen2.5-vl-7b": FlopsTable(_qwen_header),
}


def _prunes(args, default_keeps) -> list:
    """One PruneConfig per --keep / --ratio value (default: `default_keeps`), all with the
    command line's method and options."""
    if args.ratio:
        return [prune_from_args(args, ratio=r) for r in args.ratio]
    return [prune_from_args(args, keep=k) for k in args.keep or default_keeps]


def _mesh_table(
    name: str,
    cfg,
    axis_sizes,
    batch: int,
    text_tokens: int,
    new_tokens: int,
    visual_tokens: int,
    keeps,
) -> tuple[str, list[dict]]:
    rows = []
    for keep in keeps:
        r = mesh_bytes(cfg, axis_sizes, batch, text_tokens + keep + new_tokens)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "kept_tokens": keep,
                "visual_tokens": visual_tokens,
                **r,
            }
        )
    gib = 2**30
    mesh = f"data={axis_sizes['data']},model={axis_sizes['model']}"
    head = "| model | mesh | batch | keep | params / device GiB | KV cache / device GiB | total / device GiB |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {name} | {mesh} | {batch} | {r['kept_tokens']} | {r['param_bytes_per_device'] / gib:.2f} "
            f"| {r['kv_cache_bytes_per_device'] / gib:.2f} | {r['bytes_per_device'] / gib:.2f} |"
        )
    return "\n".join(lines), rows


def _table(
    cfg,
    text_tokens: int,
    new_tokens: int,
    prunes,
    kv_dtype_bytes: int,
    image_hw=None,
    video=None,
    fps=None,
) -> tuple[str, list[dict]]:
    """One row per PruneConfig of `prunes` (None: unpruned)."""
    rows = [
        estimate_model(
            cfg,
            text_tokens,
            image_hw,
            prune,
            new_tokens=new_tokens,
            kv_dtype_bytes=kv_dtype_bytes,
            video=video,
            fps=fps,
        )
        for prune in prunes
    ]
    g, t = 1e9, 1e12
    head = (
        "| keep | seq len | vision GFLOPs | projector GFLOPs | pruning GFLOPs | LLM prefill TFLOPs "
        "| prefill total TFLOPs | LLM prefill reduction | total prefill reduction | decode GFLOPs/token "
        f"| KV cache ({kv_dtype_bytes * 8}-bit) MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['kept_tokens']} | {r['sequence_length']} | {r['vision_flops'] / g:.1f} | {r['projector_flops'] / g:.2f} "
            f"| {r['pruning_flops'] / g:.3f} | {r['llm_prefill_flops'] / t:.3f} | {r['prefill_flops_total'] / t:.3f} "
            f"| {r['prefill_reduction']:.2f}x | {r['prefill_flops_total_unpruned'] / r['prefill_flops_total']:.2f}x "
            f"| {r['decode_flops_per_token'] / g:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zspa_jax.estimate", description="LLaVA-1.5-7B FLOPs/KV table"
    )
    parser.add_argument(
        "--text-tokens", type=int, default=60, help="text tokens in the prompt (default 60)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=0, help="generated tokens (KV size, decode cost)"
    )
    parser.add_argument("--model", choices=tuple(MODELS), default="llava-1.5-7b")
    parser.add_argument(
        "--image",
        default="448x448",
        help="image size HxW in pixels for models whose tokens follow "
        "it (Qwen2.5-VL, LLaVA-NeXT; default 448x448)",
    )
    parser.add_argument(
        "--video",
        default=None,
        help="a clip FRAMESxHxW (frames of HxW pixels) instead of an image, "
        "for models that take video (Qwen2.5-VL); keeps count over the whole clip (default: all, "
        "1/4, 1/8, 1/16)",
    )
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help="the clip's frame rate (sets its temporal positions "
        "only; default 24, transformers' default)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the rows as JSON instead of a table"
    )
    parser.add_argument(
        "--mesh", default=None, help="data=D,model=M: per-device parameter and KV-cache bytes"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="prompts per call (with --mesh; default 1)"
    )
    add_prune_arguments(parser, several_keeps=True)
    parser.set_defaults(keep=None)  # several budgets; default: all, 192/256, 128, 64
    args = parser.parse_args(argv)
    if args.mesh is not None:
        return _mesh_main(args, parser)
    if args.model not in FLOPS_TABLES:
        parser.error(
            f"the FLOPs table covers {' and '.join(FLOPS_TABLES)}; {args.model} goes with --mesh"
        )
    spec = FLOPS_TABLES[args.model]
    cfg = MODELS[args.model]()
    hooks = hooks_of(cfg)
    hw, video, plan = _visual_plan(args, parser, cfg, hooks)
    n = plan.visual_tokens
    if video is not None:
        default_keeps = _video_keeps(n)
    else:
        default_keeps = list(spec.keeps) if spec.keeps is not None else _default_keeps(n)
    try:
        prunes = _prunes(args, default_keeps)
    except ValueError as e:
        parser.error(str(e))
    try:  # the options against this model (e.g. a layer beyond its decoder)
        table, rows = _table(
            cfg,
            args.text_tokens,
            args.new_tokens,
            prunes,
            kv_dtype_bytes=2,
            image_hw=hw,
            video=video,
            fps=args.fps,
        )
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(spec.header(args, hw, n, rows))
    print(table)
    return 0


def _mesh_main(args, parser) -> int:
    from zspa_jax.sharding import parse_mesh_shape

    try:
        sizes = parse_mesh_shape(args.mesh)
    except ValueError as e:
        parser.error(f"--mesh: {e}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    cfg = MODELS[args.model]()
    hooks = hooks_of(cfg)
    _, video, plan = _visual_plan(args, parser, cfg, hooks)
    n = plan.visual_tokens
    try:
        prunes = _prunes(args, _video_keeps(n) if video is not None else _default_keeps(n))
    except ValueError as e:
        parser.error(str(e))
    keeps = [n if p is None else p.num_keep(n) for p in prunes]
    table, rows = _mesh_table(
        args.model, cfg, sizes, args.batch, args.text_tokens, args.new_tokens, n, keeps
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    r = rows[0]
    print(
        f"{args.model} on data={sizes['data']} x model={sizes['model']} devices: {r['param_bytes_total'] / 2**30:.1f} GiB "
        f"of parameters ({cfg.text.dtype}); B={args.batch}, {n} visual + {args.text_tokens} text + "
        f"{args.new_tokens} new tokens per row; KV heads "
        + (
            "split over model"
            if r["kv_heads_split"]
            else f"({cfg.text.num_key_value_heads}) do not divide model: replicated"
        )
    )
    print(table)
    return 0
