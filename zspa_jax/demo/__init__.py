"""The demo task and model: procedural shapes visual QA and a small LLaVA trained on it.

- `zspa_jax.demo.scenes`: the scene / question / caption generator (pure numpy + PIL).
- `zspa_jax.demo.tokenizer`: the word-level tokenizer and the HF `LlavaProcessor`.
- `zspa_jax.demo.train`: `python -m zspa_jax.demo.train` trains the model from scratch
  and ships it to `zspa_jax/assets/demo_model/` (a converted zspa_jax checkpoint); its
  pieces: `config` (TrainConfig), `data` (symbolic patch tokens, batches), `model`
  (model config and init, forward passes, losses, train step) and `evaluate` (answers,
  accuracy, per-patch readout).
- `zspa_jax.demo.export`: `export_hf(...)` writes a zspa_jax LLaVA in HF format.

Importing this package is cheap: the submodules are imported on use.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"

__all__ = ["DEMO_MODEL_DIR"]
