"""Command line: `python -m zspa_jax {demo,generate,train-demo}`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zspa_jax.pruning import PRUNE_METHODS


def _generate(args: argparse.Namespace) -> int:
    import zspa_jax

    prune = None
    if args.keep is not None or args.ratio is not None:
        prune = zspa_jax.PruneConfig(
            keep=args.keep,
            ratio=args.ratio,
            method=args.method,
            core_ratio=args.core_ratio,
            prompt_scope=args.prompt_scope,
            fastv_layer=args.fastv_layer,
        )
    mesh = None
    if args.mesh is not None:  # before the model, like the image
        from zspa_jax.sharding import device_mesh, parse_mesh_shape

        sizes = parse_mesh_shape(args.mesh)
        mesh = device_mesh(sizes["data"], sizes["model"], f"--mesh {args.mesh}")
    image = _open_image(
        args.image
    )  # before the model: a bad path fails in a second, not after loading
    vlm = zspa_jax.load(args.model, mesh=mesh)
    result = zspa_jax.generate(
        vlm, args.prompt, image, prune=prune, max_new_tokens=args.max_new_tokens
    )
    s = result.stats
    print(result.texts[0] if result.texts else result.sequences[0].tolist())
    print(
        f"[visual tokens {s['visual_tokens_kept_per_image']}/{s['visual_tokens_per_image']} | "
        f"sequence {s['prompt_tokens_per_row_pruned'][0]} (from {s['prompt_tokens_per_row'][0]}) | "
        f"prefill {s['prefill_seconds'] * 1e3:.0f} ms | "
        f"{s['new_tokens_total']} new tokens at {s['decode_tokens_per_second_total']:.1f} tok/s | "
        f"KV cache {s['kv_cache_bytes'] / 2**20:.1f} MiB]",
        file=sys.stderr,
    )
    return 0


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"--image {path!r} is a directory; give an image file")
    if not file.exists():
        raise ValueError(f"--image {path!r} does not exist")
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path!r} is not a readable image ({type(e).__name__})") from None


def check_writable_file(option: str, path: str | Path) -> Path:
    """`path` can be created or overwritten as a file: checked before any work starts."""
    file = Path(path).expanduser().absolute()
    if file.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a directory; give a file name")
    parent = file.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {str(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ValueError(f"{option} {str(path)!r} is not writable")
    existed = file.exists()
    try:  # permission bits do not bind root, and say nothing of read-only or virtual filesystems
        with open(file, "ab"):
            pass
        if not existed:
            file.unlink()
    except OSError as e:
        raise ValueError(f"{option} {str(path)!r} cannot be written ({e.strerror or e})") from None
    return file


def _core_ratio(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _demo(args: argparse.Namespace) -> int:
    from zspa_jax.demo.run import run_demo

    out = check_writable_file("--out", args.out)
    return run_demo(out=out, keep=args.keep, seed=args.seed)


def _train_demo(argv: list[str]) -> int:
    from zspa_jax.demo.train import main

    return main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-demo"]:  # its own options live in zspa_jax.demo.train
        return _train_demo(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m zspa_jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="answer questions about a generated scene with and without pruning (offline)"
    )
    demo.add_argument(
        "--out", default="zspa_demo.png", help="where to write the picture of kept tokens"
    )
    demo.add_argument(
        "--keep", type=int, default=64, help="visual tokens kept when pruning (default 64 of 576)"
    )
    demo.add_argument("--seed", type=int, default=0, help="which scene")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="answer a prompt about an image")
    gen.add_argument(
        "--model", required=True, help="directory written by `python -m convert.llava`"
    )
    gen.add_argument("--image", required=True, help="image file")
    gen.add_argument(
        "--prompt",
        required=True,
        help="question (the image token, e.g. <image>, is optional: without it the image goes first)",
    )
    budget = gen.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens to keep")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens to keep")
    gen.add_argument("--method", default="zspaprune", choices=PRUNE_METHODS)
    gen.add_argument(
        "--core-ratio", type=_core_ratio, default=0.6, help="zspaprune's r in [0, 1], or 'auto'"
    )
    gen.add_argument(
        "--fastv-layer",
        type=int,
        default=2,
        help="fastv: LLM layer K after which tokens are dropped",
    )
    gen.add_argument("--prompt-scope", default="question", choices=("question", "all_text"))
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument(
        "--mesh", default=None, help="data=D,model=M: split the model over D x M devices"
    )
    gen.set_defaults(func=_generate)

    sub.add_parser("train-demo", help="train the embedded demo model (see --help of that command)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
