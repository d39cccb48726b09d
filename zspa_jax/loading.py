"""`load(path, mesh=None, dtype=None) -> VLM`: a converted checkpoint, its config and its
HF processor, on one device or split over a mesh; `shard(vlm, mesh)` splits a loaded one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from models.checkpoint import (
    RECONVERT,
    CheckpointError,
    flatten,
    param_template,
    restore_model,
    unflatten_into,
    with_dtype,
)
from models.layers import DTYPES
from zspa_jax import sharding
from zspa_jax.families import Family, family_of, read_config
from zspa_jax.pruning import PruneConfig
from zspa_jax.validation import check_bool, check_path, type_name


@dataclasses.dataclass
class VLM:
    """A loaded vision-language model.

    `model` is the NNX module (handy for inspection and component calls); hot paths use
    `graphdef` + `state` under plain `jax.jit` (cheaper per call than `nnx.jit`).
    """

    config: Any  # the family's config (LlavaConfig, Qwen2_5_VLConfig)
    model: Any  # the family's NNX model (models.protocol)
    processor: Any | None
    path: Path | None = None
    special_token_ids: tuple[int, ...] = ()  # never part of "the prompt" for pruning
    eos_token_ids: tuple[int, ...] = ()  # default stop tokens for generate
    pad_token_id: int = 0  # written after a row has stopped
    # jax Mesh ("data", "model") the parameters are split over, or None (one device)
    mesh: Any = None
    graphdef: Any = dataclasses.field(init=False, repr=False)
    state: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.model)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image for fixed-resolution families; a family whose count follows
        each image's size (Qwen2.5-VL) has none."""
        n = self.record.tokens_per_image(self.config)
        if n is None:
            raise AttributeError(
                f"{type(self.config).__name__} has no fixed number of visual tokens per image"
            )
        return n

    @property
    def record(self) -> Family:
        """The family's record (zspa_jax.families)."""
        return family_of(self.config)

    @property
    def family(self) -> str:
        return self.record.name


def check_vlm(vlm: Any) -> None:
    if not isinstance(vlm, VLM):
        raise TypeError(
            f"vlm must be a zspa_jax.VLM (what zspa_jax.load(path) returns), got {type_name(vlm)}"
        )


def check_prune(prune: Any) -> None:
    if prune is not None and not isinstance(prune, PruneConfig):
        raise TypeError(
            f"prune must be a zspa_jax.PruneConfig (e.g. PruneConfig(keep=64)) or None, got {type_name(prune)} {prune!r}"
        )


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def token_ids(path: Path, processor) -> dict:
    """Special, EOS and pad ids from the tokenizer, generation_config.json and config.json."""
    eos, pad, special = [], [], []
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.exists():
            try:
                d = json.loads(file.read_text())
                if not isinstance(d, dict):
                    raise TypeError(f"expected a JSON object, found {type(d).__name__}")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
                raise CheckpointError(
                    f"{file} cannot be read ({type(e).__name__}: {e}); {RECONVERT}"
                ) from None
            for section in (d, d.get("text_config") or {}):
                eos += _ids(section.get("eos_token_id"))
                pad += _ids(section.get("pad_token_id"))
                special += _ids(section.get("bos_token_id"))
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is not None:
        eos = _ids(tokenizer.eos_token_id) + eos
        pad = _ids(tokenizer.pad_token_id) + pad
        special += list(tokenizer.all_special_ids)
    eos = list(dict.fromkeys(eos))
    pad_id = pad[0] if pad else (eos[0] if eos else 0)
    return {
        "special_token_ids": tuple(sorted(set(special + eos + [pad_id]))),
        "eos_token_ids": tuple(eos),
        "pad_token_id": pad_id,
    }


def config_token_ids(cfg) -> set[int]:
    """Every token id the family config names (fields `*_token_id` / `*_token_index`)."""
    return {
        int(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if f.name.endswith(("_token_id", "_token_index")) and isinstance(getattr(cfg, f.name), int)
    }


def _check_dtype(dtype) -> None:
    if dtype is not None and not isinstance(dtype, str):
        raise TypeError(
            f"dtype must be None (as stored) or a string, one of {sorted(DTYPES)}; got {type(dtype).__name__}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(
            f"dtype must be None (as stored) or one of {sorted(DTYPES)}, got {dtype!r}"
        )


def sharding_plan(cfg, mesh) -> sharding.ShardingPlan:
    """The family's rule table applied to `cfg`'s parameters on `mesh` (checked)."""
    family = family_of(cfg)
    shapes = {p: tuple(t.shape) for p, t in flatten(param_template(cfg, family.model_cls)).items()}
    plan = sharding.plan_params(shapes, family.sharding_rules, dict(mesh.shape))
    sharding.check_model_axis(plan, dict(mesh.shape))
    return plan


def load(path: str | Path, *, processor: bool = True, mesh=None, dtype: str | None = None) -> VLM:
    """Load a checkpoint written by a converter (`python -m convert.<family> SRC OUT`).

    Args:
      path: the converted directory (OUT of the converter).
      processor: also load the saved HF processor/tokenizer (if present).
      mesh: a jax Mesh with axes ("data", "model") (Explicit or Auto): every parameter is
        restored straight into its shard (zspa_jax.sharding; tensor parallel over
        "model"), and forward/generate split batches over "data". None: one device.
      dtype: "float32", "bfloat16" or "float16" to cast the parameters (and compute) to;
        None keeps the stored dtype.
    """
    check_path("path", path)
    check_bool("processor", processor)
    _check_dtype(dtype)
    mesh = None if mesh is None else sharding.program_mesh(mesh)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    cfg = read_config(path)
    family = family_of(cfg)
    if dtype is not None:
        cfg = with_dtype(cfg, dtype)
    shardings = None if mesh is None else sharding.param_shardings(mesh, sharding_plan(cfg, mesh))
    model = restore_model(path, cfg, family.model_cls, shardings)
    load_proc = family.adapter.load_processor
    proc = load_proc(path) if processor else None
    ids = token_ids(path, proc if proc is not None else load_proc(path))
    # The model's own marker tokens (vision start/end, video, ...) are never prompt text, even
    # without tokenizer files; the image placeholder is embedded as visual tokens instead.
    markers = config_token_ids(cfg)
    ids["special_token_ids"] = tuple(
        sorted(i for i in set(ids["special_token_ids"]) | markers if i != cfg.image_token_id)
    )
    return VLM(config=cfg, model=model, processor=proc, path=path, mesh=mesh, **ids)


def shard(vlm: VLM, mesh) -> VLM:
    """`vlm` with its parameters split over `mesh` as `load(..., mesh=mesh)` would place them
    (for a model built or cast in memory; loading with `mesh=` never gathers a parameter)."""
    check_vlm(vlm)
    mesh = sharding.program_mesh(mesh)
    if vlm.mesh is not None:
        raise ValueError(
            f"vlm is already split over mesh {dict(vlm.mesh.shape)}; load it again with mesh="
        )
    devices = set(mesh.devices.flat)
    outside = {d for leaf in jax.tree.leaves(vlm.state) for d in leaf.devices()} - devices
    if outside:
        raise ValueError(
            f"vlm's parameters are on {sorted(map(str, outside))}, which mesh {dict(mesh.shape)} does not hold; "
            "build the mesh over those devices or load the checkpoint with mesh="
        )
    specs = sharding.param_shardings(mesh, sharding_plan(vlm.config, mesh))
    params = nnx.to_pure_dict(nnx.state(vlm.model, nnx.Param))
    placed = unflatten_into(
        params, {p: jax.device_put(x, specs[p]) for p, x in flatten(params).items()}
    )
    graphdef, state = nnx.split(vlm.model)
    nnx.replace_by_pure_dict(state, placed)
    return dataclasses.replace(vlm, model=nnx.merge(graphdef, state), mesh=mesh)
