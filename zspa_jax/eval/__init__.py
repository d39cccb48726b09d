"""zspa_jax as an lmms-eval model, and a local lmms-eval task on the demo data.

- `zspa_jax.eval.args`: the model arguments (`pretrained`, `keep`, `method`, ...), checked.
- `zspa_jax.eval.runner`: batched `generate_until` / `loglikelihood` over `zspa_jax.generate`
  and `zspa_jax.forward` (no lmms-eval import: usable and testable on its own).
- `zspa_jax.eval.lmms_model`: the `lmms` subclass lmms-eval instantiates (`--model zspa_jax`).
- `zspa_jax.eval.plugin`: the `lmms_eval.models` entry point that registers it.
- `zspa_jax.eval.make_task`: `python -m zspa_jax.eval.make_task OUT_DIR` writes the
  `zspa_shapes` task (images, questions, answers, YAML) for `--include_path OUT_DIR`.

Importing this package is cheap: the submodules are imported on use.
"""
