"""Command line: `python -m zspa_jax {demo,generate,train-demo}`."""

from __future__ import annotations

import argparse
import sys

from zspa_jax.pruning import PRUNE_METHODS


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    import zspa_jax

    prune = None
    if args.keep is not None or args.ratio is not None:
        prune = zspa_jax.PruneConfig(
            keep=args.keep, ratio=args.ratio, method=args.method, core_ratio=args.core_ratio, prompt_scope=args.prompt_scope
        )
    vlm = zspa_jax.load(args.model)
    image = Image.open(args.image).convert("RGB")
    result = zspa_jax.generate(vlm, args.prompt, image, prune=prune, max_new_tokens=args.max_new_tokens)
    s = result.stats
    print(result.texts[0] if result.texts else result.sequences[0].tolist())
    print(
        f"[visual tokens {s['visual_tokens_kept']}/{s['visual_tokens_in']} | sequence {s['sequence_length_after']} "
        f"(from {s['sequence_length_before']}) | prefill {s['prefill_seconds'] * 1e3:.0f} ms | "
        f"{s['new_tokens']} new tokens at {s['decode_tokens_per_second']:.1f} tok/s | "
        f"KV cache {s['kv_cache_bytes'] / 2**20:.1f} MiB]",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from zspa_jax.demo.run import run_demo

    return run_demo(out=args.out, keep=args.keep, seed=args.seed)


def _train_demo(argv: list[str]) -> int:
    from zspa_jax.demo.train import main

    return main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-demo"]:  # its own options live in zspa_jax.demo.train
        return _train_demo(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m zspa_jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="answer questions about a generated scene with and without pruning (offline)")
    demo.add_argument("--out", default="zspa_demo.png", help="where to write the picture of kept tokens")
    demo.add_argument("--keep", type=int, default=64, help="visual tokens kept when pruning (default 64 of 576)")
    demo.add_argument("--seed", type=int, default=0, help="which scene")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="answer a prompt about an image")
    gen.add_argument("--model", required=True, help="directory written by `python -m convert.llava`")
    gen.add_argument("--image", required=True, help="image file")
    gen.add_argument("--prompt", required=True, help="question; include the image token unless the model has a chat template")
    budget = gen.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens to keep")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens to keep")
    gen.add_argument("--method", default="zspaprune", choices=PRUNE_METHODS)
    gen.add_argument("--core-ratio", type=float, default=0.6)
    gen.add_argument("--prompt-scope", default="question", choices=("question", "all_text"))
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.set_defaults(func=_generate)

    sub.add_parser("train-demo", help="train the embedded demo model (see --help of that command)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
