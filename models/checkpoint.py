"""On-disk format of a converted model: our config JSON + orbax params + HF processor files.

    OUT/zspa_config.json   {"format": ..., "model": "llava", "config": LlavaConfig.to_dict()}
    OUT/params/            orbax-checkpoint of the NNX Param state as a plain nested dict
    OUT/config.json, tokenizer*, preprocessor_config.json, ...   copied from the HF source
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from models.llava import LlavaConfig, LlavaForConditionalGeneration

CONFIG_NAME = "zspa_config.json"
PARAMS_DIR = "params"
FORMAT = "zspa_jax.checkpoint/1"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict (int or str keys) -> {"a.0.b": leaf}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten_into(template: dict, flat: dict[str, Any], prefix: str = "") -> dict:
    """Rebuild `template`'s nesting (keeping its int/str keys) with leaves from `flat`."""
    out = {}
    for key, value in template.items():
        path = f"{prefix}{key}"
        out[key] = unflatten_into(value, flat, path + ".") if isinstance(value, dict) else flat[path]
    return out


def abstract_model(cfg: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model with ShapeDtypeStruct params: costs no memory, no compute."""
    return nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))


def param_template(cfg: LlavaConfig) -> dict:
    """Nested dict of ShapeDtypeStruct, the exact tree `restore_model` expects."""
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))


def write_config(directory: Path, cfg: LlavaConfig, extra: dict | None = None) -> None:
    payload = {"format": FORMAT, "model": "llava", "config": cfg.to_dict(), **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")


def read_config(directory: Path) -> LlavaConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} is not a converted zspa_jax checkpoint ({CONFIG_NAME} missing); "
            "convert a Hugging Face model first with `python -m convert.llava SRC OUT`"
        )
    payload = json.loads(path.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {payload.get('format')!r}; expected {FORMAT!r}")
    return LlavaConfig.from_dict(payload["config"])


def save_params(directory: Path, params: dict) -> None:
    """Write a nested dict of numpy/jax arrays (dtypes kept) with orbax."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((Path(directory) / PARAMS_DIR).absolute(), params)
        checkpointer.wait_until_finished()


def restore_model(directory: Path, cfg: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """Restore params straight into an abstract model's tree (no random init, dtype kept)."""
    cfg = read_config(directory) if cfg is None else cfg
    model = abstract_model(cfg)
    graphdef, abstract_state = nnx.split(model)
    template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore((Path(directory) / PARAMS_DIR).absolute(), template)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
