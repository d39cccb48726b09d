"""`python -m zspa_jax.eval.make_task OUT_DIR [--n 70]`: the `zspa_shapes` lmms-eval task.

Writes the first `n` test-split questions of the procedural shapes VQA
(`zspa_jax.demo.scenes.examples("test", n)`, exactly the questions
`benchmarks/accuracy.py` scores) as a local dataset, and the task YAML beside it:

    OUT_DIR/zspa_shapes/zspa_shapes.yaml          the task: exact match on one-word answers
    OUT_DIR/zspa_shapes/zspa_shapes_utils.py      doc_to_visual / doc_to_text (imports this module)
    OUT_DIR/zspa_shapes/data/test/00000.png ...   the rendered scenes (lossless)
    OUT_DIR/zspa_shapes/data/test/metadata.jsonl  file_name, index, question, answer, qtype

so that, fully offline,

    lmms-eval --model zspa_jax --model_args pretrained=DEMO_MODEL_DIR --tasks zspa_shapes --include_path OUT_DIR

evaluates a model on it. The prompt is what the demo model was trained on and what the
benchmark feeds (`scenes.chat_prompt(question)`: the demo model has no chat template), and
the answer is the first generated token (`max_new_tokens: 1`), which is what the benchmark
scores (greedy argmax at the answer position).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK = "zspa_shapes"

_UTILS = '''"""Document functions of the zspa_shapes task (written by python -m zspa_jax.eval.make_task)."""

from zspa_jax.eval.make_task import doc_to_text, doc_to_visual  # noqa: F401
'''

_YAML = """# Written by python -m zspa_jax.eval.make_task: {n} test questions of the demo shapes VQA.
task: {task}
dataset_path: imagefolder
dataset_kwargs:
  data_dir: {data_dir}
test_split: test
output_type: generate_until
doc_to_visual: !function {task}_utils.doc_to_visual
doc_to_text: !function {task}_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def doc_to_visual(doc: dict) -> list:
    """The scene image of a document (one RGB PIL image)."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The prompt the demo model answers: system line, `<image>`, question, `assistant :`."""
    from zspa_jax.demo import scenes

    return scenes.chat_prompt(doc["question"])


def write_task(out_dir: str | Path, n: int = 70) -> Path:
    """Write the task directory `out_dir/zspa_shapes` (replacing its files); return it."""
    from zspa_jax.demo import scenes

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    task_dir = Path(out_dir).expanduser().resolve() / TASK
    data = task_dir / "data" / "test"
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob("*.png"):
        old.unlink()
    rows = []
    for i, ex in enumerate(scenes.examples("test", n)):
        name = f"{i:05d}.png"
        ex.image().save(data / name)
        rows.append(
            {
                "file_name": name,
                "index": i,
                "question": ex.qa.question,
                "answer": ex.qa.answer,
                "qtype": ex.qa.qtype,
            }
        )
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / f"{TASK}_utils.py").write_text(_UTILS)
    (task_dir / f"{TASK}.yaml").write_text(
        _YAML.format(n=n, task=TASK, data_dir=json.dumps(str(task_dir / "data")))
    )
    return task_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out_dir", help="where to write the task (pass it to lmms-eval as --include_path)"
    )
    parser.add_argument("--n", type=int, default=70, help="test questions (default 70)")
    args = parser.parse_args(argv)
    try:
        task_dir = write_task(args.out_dir, args.n)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from zspa_jax.demo.run import demo_model_path

    print(
        f"wrote {args.n} questions to {task_dir}\nrun:\n  lmms-eval --model zspa_jax --model_args "
        f"pretrained={demo_model_path()} --tasks {TASK} --include_path {task_dir.parent}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
