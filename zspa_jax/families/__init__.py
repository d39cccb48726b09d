"""Model families: one record per family (`Family`), one module per family.

To add a family, write its models/ file (config + NNX modules implementing
models.protocol), its convert/ table, and a package here with its `Family` record, host
adapter and layout, estimate hooks and processor, and list the record in `_RECORDS`. The checkpoint records the family's
name; `zspa_jax.load` looks it up here.
"""

from __future__ import annotations

from pathlib import Path

from models import checkpoint
from models.checkpoint import CONFIG_NAME, RECONVERT, CheckpointError, read_payload
from zspa_jax.families import llava, llava_next, qwen2_5_vl
from zspa_jax.families.base import Family

_RECORDS = (llava.FAMILY, qwen2_5_vl.FAMILY, llava_next.FAMILY)
FAMILIES: dict[str, Family] = {f.name: f for f in _RECORDS}

__all__ = [
    "FAMILIES",
    "Family",
    "family_of",
    "get_family",
    "param_template",
    "read_config",
    "restore_model",
    "video_arg_names",
    "visual_arg_names",
]


def visual_arg_names() -> tuple[str, ...]:
    """Every visual array name (besides pixel_values) some family takes (`Family.visual_args`)."""
    return tuple(dict.fromkeys(name for f in _RECORDS for name in f.visual_args))


def video_arg_names() -> tuple[str, ...]:
    """Every video array name some family takes (`Family.video_args`)."""
    return tuple(dict.fromkeys(name for f in _RECORDS for name in f.video_args))


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model family {name!r}; this version reads {sorted(FAMILIES)}"
        ) from None


def family_of(vlm_or_config) -> Family:
    """The record of a VLM's or a config's family."""
    cfg = getattr(vlm_or_config, "config", vlm_or_config)
    for family in FAMILIES.values():
        if isinstance(cfg, family.config_cls):
            return family
    raise TypeError(
        f"{type(cfg).__name__} is not the config of a registered model family ({sorted(FAMILIES)})"
    )


def read_config(directory: str | Path):
    """The family config recorded in a converted checkpoint (`zspa_config.json`)."""
    name, payload = read_payload(Path(directory))
    path = Path(directory) / CONFIG_NAME
    if name not in FAMILIES:
        raise CheckpointError(
            f"{path}: unknown model family {name!r}; this version reads {sorted(FAMILIES)}; {RECONVERT}"
        )
    try:
        return FAMILIES[name].config_cls.from_dict(payload)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path} holds an invalid model config ({type(e).__name__}: {e}); {RECONVERT}"
        ) from None


def param_template(cfg) -> dict:
    """The parameter tree (ShapeDtypeStruct leaves) of `cfg`'s family model."""
    return checkpoint.param_template(cfg, family_of(cfg).model_cls)


def restore_model(directory: str | Path, cfg=None, shardings=None):
    """The NNX model stored in a converted checkpoint (config as recorded unless given)."""
    cfg = read_config(directory) if cfg is None else cfg
    return checkpoint.restore_model(Path(directory), cfg, family_of(cfg).model_cls, shardings)
