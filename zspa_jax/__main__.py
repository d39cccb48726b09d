"""Command line: `python -m zspa_jax {demo,generate,train-demo}`.

`generate` takes what `zspa_jax.generate` takes: several images (--image, repeated), videos
(--video: a file or a folder of frames), the pruning budget, method, budget scope and the
method's options (one flag each, generated from the method records: zspa_jax.prune_args)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zspa_jax.prune_args import add_prune_arguments


def _generate(args: argparse.Namespace) -> int:
    import zspa_jax
    from zspa_jax.prune_args import prune_from_args

    prune = prune_from_args(args)
    mesh = None
    if args.mesh is not None:  # before the model, like the images
        from zspa_jax.sharding import device_mesh, parse_mesh_shape

        sizes = parse_mesh_shape(args.mesh)
        mesh = device_mesh(sizes["data"], sizes["model"], f"--mesh {args.mesh}")
    # Before the model: a bad path fails in a second, not after loading.
    images = [_open_image(path) for path in args.image]
    videos = [_open_video(path, args.fps, args.num_frames) for path in args.video]
    if args.fps is not None and not videos:
        raise ValueError("--fps is the frame rate of --video; give --video")
    if args.num_frames is not None and not videos:
        raise ValueError("--num-frames samples the frames of --video; give --video")
    vlm = zspa_jax.load(args.model, mesh=mesh)
    result = zspa_jax.generate(
        vlm,
        [args.prompt],
        [images] if images else None,
        videos=[videos] if videos else None,
        prune=prune,
        max_new_tokens=args.max_new_tokens,
    )
    s = result.stats
    print(result.texts[0] if result.texts else result.sequences[0].tolist())
    print(
        f"[visual tokens {s['visual_tokens_kept_per_row']}/{s['visual_tokens_per_row'][0]} | "
        f"sequence {s['prompt_tokens_per_row_pruned'][0]} (from {s['prompt_tokens_per_row'][0]}) | "
        f"prefill {s['prefill_seconds'] * 1e3:.0f} ms | "
        f"{s['new_tokens_total']} new tokens at {s['decode_tokens_per_second_total']:.1f} tok/s | "
        f"KV cache {s['kv_cache_bytes'] / 2**20:.1f} MiB]",
        file=sys.stderr,
    )
    return 0


def _open_image(path: str, flag: str = "--image"):
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{flag} {path!r} is a directory; give an image file")
    if not file.exists():
        raise ValueError(f"{flag} {path!r} does not exist")
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{flag} {path!r} is not a readable image ({type(e).__name__})") from None


def _open_video(path: str, fps: float | None, num_frames: int | None):
    """A `zspa_jax.Video` from a video file (decoded by PyAV; its frame rate unless `fps`)
    or a folder of frame images (in file-name order)."""
    from zspa_jax import Video

    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"--video {path!r} does not exist")
    if folder.is_dir():
        names = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"--video {path!r} is an empty folder; give a video file or frames")
        frames = [_open_image(str(p), "--video frame") for p in names]
        return Video(frames, fps=fps, num_frames=num_frames)
    try:
        import av
    except ImportError:
        raise ValueError(
            f"--video {path!r}: decoding a video file needs PyAV (pip install av); "
            "a folder of frame images works without it"
        ) from None
    try:
        with av.open(str(folder)) as container:
            if not container.streams.video:
                raise ValueError(f"--video {path!r} has no video stream")
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = float(stream.average_rate) if stream.average_rate else None
    except av.FFmpegError as e:
        raise ValueError(f"--video {path!r} is not a readable video ({type(e).__name__})") from None
    if not frames:
        raise ValueError(f"--video {path!r} holds no frames")
    import numpy as np

    return Video(np.stack(frames), fps=rate if fps is None else fps, num_frames=num_frames)


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

    gen = sub.add_parser(
        "generate", help="answer a prompt about images or videos, optionally pruning visual tokens"
    )
    gen.add_argument(
        "--model",
        required=True,
        help="a converted checkpoint directory (written by `python -m convert.<family>`, e.g. "
        "convert.llava, convert.llava_next, convert.qwen2_5_vl)",
    )
    gen.add_argument(
        "--image",
        action="append",
        default=[],
        help="an image file (repeat the flag for several images, in reading order)",
    )
    gen.add_argument(
        "--video",
        action="append",
        default=[],
        help="a video file (decoded with PyAV) or a folder of frame images, for models that "
        "take video (Qwen2.5-VL); repeat the flag for several",
    )
    gen.add_argument(
        "--fps",
        type=float,
        help="the videos' frame rate (default: a file's own; a folder's: 24, transformers' default)",
    )
    gen.add_argument(
        "--num-frames", type=int, help="keep this many evenly spaced frames of each video"
    )
    gen.add_argument(
        "--prompt",
        required=True,
        help="question (the image token, e.g. <image>, is optional: without it the images go first)",
    )
    add_prune_arguments(gen)
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
