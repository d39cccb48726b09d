"""The `lmms_eval.models` entry point: registers `--model zspa_jax` with lmms-eval (>= 0.7).

pyproject.toml declares `zspa_jax = "zspa_jax.eval.plugin:manifest"` in that group;
lmms-eval calls `manifest()` when it builds its model registry. Nothing heavy is imported
until lmms-eval asks for the class.
"""

from __future__ import annotations

MODEL_ID = "zspa_jax"
CLASS_PATH = "zspa_jax.eval.lmms_model.ZSPAJax"


def manifest():
    """lmms-eval's `ModelManifest` for the zspa_jax model (a simple, prompt + images model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
