"""Train the small demo LLaVA on the procedural shapes task, export it, ship it.

    python -m zspa_jax.demo.train [--out DIR] [--quick] [--seed N] ...

Model: our `models.llava` LLaVA with a narrow CLIP-style ViT (96 px images, 4 px patches
-> 24 x 24 = 576 visual tokens, like LLaVA-1.5 at 336 px / 14 px), an exact-GELU
two-layer MLP projector and a small LLaMA decoder over the word-level vocabulary.

Nothing here is pretrained, and two CPU cores allow a few hundred image steps, so the
recipe is LLaVA's two stages preceded by a cheap stand-in for the two things LLaVA
inherits (a pretrained LLM, and CLIP features that already mean something):

* Stage 0, LLM pretraining on *symbolic scenes* (no images, no tower). Each patch is
  given to the LLM as the word embeddings of what lies under it: for each of the (at
  most two) objects covering it, E[colour] + E[shape] + E[grid cell of the object],
  weighted by the fraction of the patch it covers; the background colour word weighted
  by the rest; and E["a"] on the patch holding an object's centre - one marker per
  object instance, since counting patches cannot count objects of different sizes.
  Tokens sit at their real RoPE positions among the 576 image slots (every object patch
  plus random background patches, to keep sequences short). The LLM learns the chat
  format, captions and the questions from "perfect vision" at a tenth of the cost of an
  image step. (Trained from scratch on pixels, a decoder settles on answer priors and
  ignores the question for a long time.)
* Stage 1, alignment: like LLaVA's first stage the LLM is frozen; the projector - and,
  since ours is random, the tower - learn to produce each patch's symbolic token from
  pixels (squared error against the frozen embedding table's mixture). The LLM's forward
  pass is not needed, so this stage is cheap.
* Stage 2, instruction tuning on one-word visual QA (loss on the response tokens only:
  answer word and `</s>`), captions kept in the mix at a lower weight, the alignment
  loss kept as a regulariser (`align_weight`); everything trains.

The symbolic targets make visual tokens sit near the words that describe them in the
LLM's input-embedding space. That stands in for CLIP-style image-text alignment, and it
is also the premise of ZSPAPrune's relevance score (cosine of each visual token to the
mean prompt embedding): an inductive bias chosen on purpose and stated in the benchmark
report - results on this model show the method where its premise holds, not evidence
about real CLIP features.

Attention starts from a "mimetic" initialisation (Trockman & Kolter, 2023): each
decoder layer's key projection starts equal to its query projection (so W_q W_k^T is
positive semi-definite: tokens attend to tokens that look like them) and the output
projection starts as the transpose of the value projection (attention starts by
copying). Retrieval - find the visual tokens that carry the question's words - is the
core skill here, and this start makes it emerge in hundreds instead of thousands of
steps.

Two efficiency devices, both exact:
* Prefix sharing: one image's prefix (`<s>` + system line + 576 visual tokens) is
  followed by several independent question/answer segments. Each segment attends to the
  prefix and to itself only, with RoPE positions continuing from the prefix as if it
  were the only question, so every segment sees exactly what a single-question prompt
  sees; the 8 questions per image then cost little more than 1. Stage 0 (short prefix)
  has its own count, `--symbolic-qa-per-image` (default 8). The final accuracy is bound
  by the tower's shape recognition (benchmarks/demo_readout.py measures it on the
  shipped model).
* The last decoder layer runs on the text area only (nothing reads its outputs at the
  576 visual positions), and logits are computed there only.

Deterministic for a seed (data is a pure function of the scene index; init and step
order fixed). The final export goes through `zspa_jax.demo.export.export_hf` (HF LLaVA
format, in a temp dir) and the real converter into `zspa_jax/assets/demo_model/`.

This module is the driver (the stage loop, the command line, the export); the pieces live in
`zspa_jax.demo.config` (TrainConfig), `.data` (symbolic tokens, batches), `.model` (config,
init, forward passes, losses, train step) and `.evaluate` (answers, accuracy, readouts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from zspa_jax.demo import DEMO_MODEL_DIR, scenes
from zspa_jax.demo.config import QUICK, TrainConfig
from zspa_jax.demo.data import Batches, patch_words, prefetch, prefix_ids
from zspa_jax.demo.evaluate import accuracy_report, answer_batch, patch_readout_accuracy
from zspa_jax.demo.model import init_model, make_optimizer, make_train_step, model_config
from zspa_jax.demo.tokenizer import FastEncoder, build_processor, build_tokenizer

INFO_NAME = "demo_info.json"
STAGES = {0: "symbolic scenes, LLM only", 1: "alignment, LLM frozen", 2: "visual QA"}


def train(tc: TrainConfig, progress: bool = True, log=print):
    """Train from scratch; returns (model, llava_config, history dict)."""
    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    from models.llava import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    enc = FastEncoder(tokenizer)
    cfg = model_config(tc, len(tokenizer))
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(tc.seed))
    init_model(model, tc.seed)
    graphdef, state = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    log(
        f"demo LLaVA: {n_params:,} parameters; vocab {len(tokenizer)}; {cfg.image_seq_length} visual tokens"
    )
    data = Batches(tc, enc)
    prefix = jax.numpy.asarray(prefix_ids(enc))
    val = scenes.examples("val", tc.eval_examples)
    readout_scenes = [ex.scene for ex in val[:48]]
    readout_pixels = np.stack([enc.pixels(sc.render()) for sc in readout_scenes])
    readout_words = [patch_words(sc, enc.vocab) for sc in readout_scenes]
    features = jax.jit(lambda st, px: nnx.merge(graphdef, st).image_features(px))
    history: dict = {"parameters": int(n_params), "stages": {}}
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    schedule = (
        (0, tc.symbolic_steps, tc.symbolic_lr),
        (1, tc.stage1_steps, tc.stage1_lr),
        (2, tc.stage2_steps, tc.stage2_lr),
    )
    for stage, steps, lr in schedule:
        if steps == 0:
            continue
        optimizer = make_optimizer(
            tc, steps, lr, state, frozen="language_model" if stage == 1 else None
        )
        opt_state = optimizer.init(state)
        train_step = make_train_step(graphdef, optimizer, stage, tc.align_weight)
        losses = []
        t0, c0 = time.perf_counter(), _cpu_seconds()
        bar = tqdm(
            prefetch(partial(data.batch, stage), range(steps)),
            total=steps,
            desc=f"stage {stage} ({STAGES[stage]})",
            disable=not progress,
            unit="step",
            mininterval=2.0,
        )
        evals = []
        for step, batch in enumerate(bar):
            state, opt_state, m = train_step(state, opt_state, prefix, batch)
            m = {k: float(v) for k, v in m.items()}
            losses.append(m)
            bar.set_postfix(
                {k: f"{v:.3f}" for k, v in m.items() if k != "grad_norm"}, refresh=False
            )
            if (
                stage == 2
                and tc.eval_every
                and (step + 1) % tc.eval_every == 0
                and step + 1 < steps
            ):
                acc = accuracy_report(val, answer_batch(graphdef, state, enc, val))
                evals.append({"step": step + 1, **acc})
                bar.write(
                    f"  step {step + 1}: val accuracy {acc['overall']:.3f} " + _fmt(acc["per_type"])
                )
        tail = losses[-min(20, len(losses)) :]
        history["stages"][str(stage)] = {
            "name": STAGES[stage],
            "steps": steps,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": _cpu_seconds() - c0,
            "first": losses[0],
            "final": {k: float(np.mean([m[k] for m in tail])) for k in tail[0]},
            "evals": evals,
        }
        h = history["stages"][str(stage)]
        log(
            f"stage {stage} ({STAGES[stage]}): {steps} steps in {h['seconds']:.0f} s "
            f"({h['cpu_seconds']:.0f} CPU-s); final (mean of last {len(tail)}) {_fmt(h['final'])}"
        )
        if stage == 0:  # the ceiling a perfect tower would give this LLM
            answers = answer_batch(graphdef, state, enc, val, symbolic_tokens=tc.symbolic_tokens)
            h["symbolic_val"] = accuracy_report(val, answers)
            log(
                f"  val accuracy from perfect symbolic tokens {h['symbolic_val']['overall']:.3f} "
                + _fmt(h["symbolic_val"]["per_type"])
            )
        else:
            table = np.asarray(
                nnx.merge(graphdef, state).language_model.model.embed_tokens.embedding[...]
            )
            visual = np.asarray(features(state, readout_pixels))
            h["patch_readout"] = patch_readout_accuracy(visual, table, enc.vocab, readout_words)
            log(f"  per-patch readout of the visual tokens {_fmt(h['patch_readout'])}")
    history["seconds"] = time.perf_counter() - start
    history["cpu_seconds"] = _cpu_seconds() - cpu0
    acc = accuracy_report(val, answer_batch(graphdef, state, enc, val))
    history["val"] = acc
    log(
        f"training took {history['seconds']:.0f} s ({history['cpu_seconds']:.0f} CPU-s); "
        f"val accuracy {acc['overall']:.3f} {_fmt(acc['per_type'])}"
    )
    return nnx.merge(graphdef, state), cfg, history


def _fmt(d: dict) -> str:
    return json.dumps({k: round(v, 3) for k, v in d.items()})


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): a load-independent cost."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ship(model, cfg, history: dict, tc: TrainConfig, out: Path, log=print) -> dict:
    """Export to HF format in a temp dir, convert with the real converter into `out`."""
    from convert.llava import convert
    from zspa_jax.demo.export import export_hf

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    with tempfile.TemporaryDirectory(prefix="zspa-demo-hf-") as tmp:
        export_hf(model, cfg, tokenizer, processor, tmp)
        summary = convert(tmp, out, dtype="float32", force=True, progress=False)
    info = {
        "description": "demo LLaVA trained from scratch on zspa_jax.demo.scenes (procedural shapes visual QA)",
        "prompt_template": scenes.chat_prompt("{question}"),
        "example_questions": [
            "what colour is the circle ?",
            "what shape is the red object ?",
            "where is the blue star ?",
            "is there a green square ?",
            "how many triangles are there ?",
            "how many shapes are there ?",
            "what colour is the background ?",
            scenes.CAPTION_QUESTION,
        ],
        "train_config": dataclasses.asdict(tc),
        "history": history,
        "parameters": summary["parameters"],
    }
    (Path(out) / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    log(
        f"shipped {summary['parameters']:,} parameters ({summary['bytes'] / 2**20:.1f} MiB f32) -> {out}"
    )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zspa_jax.demo.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out",
        default=str(DEMO_MODEL_DIR),
        help=f"converted checkpoint directory (default {DEMO_MODEL_DIR})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and a few steps (smoke test)"
    )
    parser.add_argument("--no-export", action="store_true", help="train and evaluate only")
    parser.add_argument(
        "--test-examples", type=int, default=700, help="test questions scored at the end (0: skip)"
    )
    for field in dataclasses.fields(TrainConfig):
        kind = type(field.default)
        if kind is bool:
            kind = lambda v: v.lower() in ("1", "true", "yes", "on")  # noqa: E731
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=None,
            metavar=type(field.default).__name__.upper(),
        )
    args = parser.parse_args(argv)
    overrides = dict(QUICK) if args.quick else {}
    overrides.update(
        {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name) is not None
        }
    )
    tc = TrainConfig(**overrides)
    print(f"config: {json.dumps(dataclasses.asdict(tc))}")
    model, cfg, history = train(tc)
    if args.test_examples:
        from flax import nnx

        graphdef, state = nnx.split(model)
        test = scenes.examples("test", args.test_examples)
        acc = accuracy_report(test, answer_batch(graphdef, state, FastEncoder(), test))
        history["test"] = acc
        print(f"test accuracy ({len(test)} questions) {acc['overall']:.3f} {_fmt(acc['per_type'])}")
    if not args.no_export:
        ship(model, cfg, history, tc, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
