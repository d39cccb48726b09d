"""Diagnostics of the shipped demo model (zspa_jax/assets/demo_model): where its accuracy goes.

    python benchmarks/demo_readout.py        # -> benchmarks/results/demo_readout.{json,md}

Two measurements, both on held-out scenes (the `val` and `test` splits of zspa_jax.demo.scenes):

* per-patch readout (zspa_jax.demo.evaluate.patch_readout_accuracy): each visual token of a
  patch mostly (> 50 %) covered by one object is read through the LLM's embedding table;
  for each word group (colour: 6 words, shape: 5, grid cell: 9) it counts how often the
  word with the largest dot product is that object's. This is what the training log
  prints after stages 1 and 2, here for the model as shipped.
* the shipped decoder's accuracy when its tower's visual tokens are replaced by perfect
  symbolic patch tokens (every image slot holds its patch's words, as in stage 0;
  zspa_jax.demo.evaluate.answer_batch with symbolic_tokens) vs its accuracy from pixels, on
  the same questions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import zspa_jax  # noqa: E402
from zspa_jax.demo import scenes  # noqa: E402
from zspa_jax.demo.data import patch_words  # noqa: E402
from zspa_jax.demo.evaluate import accuracy_report, answer_batch, patch_readout_accuracy  # noqa: E402
from zspa_jax.demo.tokenizer import FastEncoder, build_tokenizer  # noqa: E402

MODEL = ROOT / "zspa_jax" / "assets" / "demo_model"


def readout(vlm, enc, split: str, n_scenes: int, batch: int = 16) -> dict:
    exs = scenes.examples(split, n_scenes)
    table = np.asarray(vlm.model.language_model.model.embed_tokens.embedding[...])
    features = jax.jit(lambda px: vlm.model.image_features(px))
    visual, words = [], []
    for s in range(0, len(exs), batch):
        chunk = [e.scene for e in exs[s : s + batch]]
        px = np.stack([enc.pixels(sc.render()) for sc in chunk])
        pad = batch - len(chunk)
        if pad:
            px = np.concatenate([px, np.zeros((pad, *px.shape[1:]), px.dtype)])
        visual.append(np.asarray(features(px))[: len(chunk)])
        words += [patch_words(sc, enc.vocab) for sc in chunk]
    visual = np.concatenate(visual)
    patches = int(sum((w[:, 1] > 0.5).sum() for _, w in words))
    return {
        "split": split,
        "scenes": n_scenes,
        "patches": patches,
        **patch_readout_accuracy(visual, table, enc.vocab, words),
    }


def symbolic_vs_pixels(vlm, enc, split: str, n: int, symbolic_tokens: int) -> dict:
    exs = scenes.examples(split, n)
    pixels = accuracy_report(exs, answer_batch(vlm.graphdef, vlm.state, enc, exs))
    symbolic = accuracy_report(
        exs, answer_batch(vlm.graphdef, vlm.state, enc, exs, symbolic_tokens=symbolic_tokens)
    )
    return {
        "split": split,
        "questions": n,
        "symbolic_tokens": symbolic_tokens,
        "pixels": pixels,
        "symbolic": symbolic,
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Demo model diagnostics (`benchmarks/demo_readout.py`)",
        "",
        f"Model: `zspa_jax/assets/demo_model` ({res['parameters']:,} parameters). Machine: {m['platform']}, "
        f"{m['cpu_count']} CPUs, jax {m['jax']} ({m['jax_backend']}); {res['seconds']:.0f} s.",
        "",
        "## Per-patch readout of the visual tokens",
        "",
        "On patches mostly covered by one object, the fraction whose visual token, read through the LLM's "
        "embedding table, names that object's colour / shape / grid cell (largest dot product within the "
        "group; chance 1/6, 1/5, 1/9).",
        "",
        "| split | scenes | patches | colour | shape | cell |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["readout"]:
        lines.append(
            f"| {r['split']} | {r['scenes']} | {r['patches']} | {r['colour']:.3f} | {r['shape']:.3f} | {r['cell']:.3f} |"
        )
    types = list(scenes.QUESTION_TYPES)
    lines += [
        "",
        "## The shipped decoder from perfect symbolic patch tokens vs from its tower",
        "",
        "Same questions; symbolic = each scene's exact patch words (stage 0's input) at "
        f"{res['accuracy'][0]['symbolic_tokens']} of the 576 image positions replace the tower's visual tokens.",
        "",
        "| split | questions | input | overall | " + " | ".join(types) + " |",
        "|---|---|---|---|" + "---|" * len(types),
    ]
    for r in res["accuracy"]:
        for name in ("pixels", "symbolic"):
            a = r[name]
            per = " | ".join(f"{a['per_type'].get(t, float('nan')):.2f}" for t in types)
            lines.append(
                f"| {r['split']} | {r['questions']} | {name} | {a['overall']:.3f} | {per} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scenes", type=int, default=200, help="scenes per split for the readout")
    ap.add_argument(
        "--questions", type=int, default=700, help="questions per split for the accuracy comparison"
    )
    ap.add_argument(
        "--symbolic-tokens",
        type=int,
        default=576,
        help="patches given symbolically (576: all; stage 0 trained on 112: those objects touch + random background)",
    )
    ap.add_argument(
        "--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "demo_readout"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    vlm = zspa_jax.load(MODEL, processor=False)
    enc = FastEncoder(build_tokenizer())
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
        },
        "parameters": int(sum(x.size for x in jax.tree.leaves(vlm.state))),
        "readout": [readout(vlm, enc, split, args.scenes) for split in ("val", "test")],
        "accuracy": [
            symbolic_vs_pixels(vlm, enc, split, args.questions, args.symbolic_tokens)
            for split in ("val", "test")
        ],
    }
    res["seconds"] = time.perf_counter() - t0
    md = markdown(res)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(md)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return res


if __name__ == "__main__":
    main()
