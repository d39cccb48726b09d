"""On-disk format of a converted model: our config JSON + orbax params + HF processor files.

    OUT/zspa_config.json          {"format": ..., "model": FAMILY, "config": <family config>.to_dict()}
    OUT/params/manifest.json      {"groups": [["vision_tower.embeddings.class_embedding", ...], ...]}
    OUT/params/00000, 00001, ...  one orbax-checkpoint per group of parameters (<= 128 MiB, or one tensor)
    OUT/config.json, tokenizer*, preprocessor_config.json, ...   copied from the HF source

Parameters are written in groups so a converter holds one group in memory at a time,
whatever the model size; restoring fills one abstract tree, keeping dtypes. FAMILY names
the model family; `zspa_jax.families` maps it to the config and model classes (this
module knows no family).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

CONFIG_NAME = "zspa_config.json"
PARAMS_DIR = "params"
MANIFEST_NAME = "manifest.json"
FORMAT = "zspa_jax.checkpoint/1"
GROUP_BYTES = 128 * 2**20


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
        out[key] = (
            unflatten_into(value, flat, path + ".") if isinstance(value, dict) else flat[path]
        )
    return out


def abstract_model(cfg, model_cls):
    """The model with ShapeDtypeStruct params: costs no memory, no compute."""
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))


def param_template(cfg, model_cls) -> dict:
    """Nested dict of ShapeDtypeStruct, the exact tree `restore_model` expects."""
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg, model_cls), nnx.Param))


def write_config(directory: Path, family: str, cfg, extra: dict | None = None) -> None:
    payload = {"format": FORMAT, "model": family, "config": cfg.to_dict(), **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")


RECONVERT = "re-run the converter (python -m convert.<family> SRC OUT --force)"


class CheckpointError(ValueError):
    """A checkpoint file (a converted one, or a source safetensors file) is missing, truncated
    or malformed; the message names the file."""


def read_payload(directory: Path) -> tuple[str, dict]:
    """(family name, family config dict) recorded in `directory`."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} is not a converted zspa_jax checkpoint ({CONFIG_NAME} missing); "
            "convert a Hugging Face model first with `python -m convert.<family> SRC OUT` (e.g. convert.llava)"
        )
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); {RECONVERT}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else payload
        raise CheckpointError(
            f"{path}: unknown checkpoint format {found!r}; expected {FORMAT!r}; {RECONVERT}"
        )
    name = payload.get("model")
    if not isinstance(name, str):
        raise CheckpointError(
            f'{path} does not name its model family (the "model" field); {RECONVERT}'
        )
    config = payload.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f'{path} holds no model config (the "config" field); {RECONVERT}')
    return name, config


def _nest(flat: dict[str, Any]) -> dict:
    """{"a.0.b": x} -> {"a": {"0": {"b": x}}} (string keys: orbax's on-disk form)."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, inflating peak RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class ParamWriter:
    """Streams named arrays into grouped orbax checkpoints; call `close()` to finish.

    Arrays are held only until their group (about `group_bytes`) is written.
    """

    def __init__(self, directory: Path, group_bytes: int = GROUP_BYTES):
        self.root = (Path(directory) / PARAMS_DIR).absolute()
        self.root.mkdir(parents=True, exist_ok=False)
        self.group_bytes = group_bytes
        self.groups: list[list[str]] = []
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        # orbax's default numpy handler deep-copies every array so the caller may mutate it
        # during an async save; this writer saves synchronously and drops its arrays after,
        # so the copy would only double the peak memory of the largest tensor.
        # The jax.Array entry is never used for writing; orbax warns on every save without one.
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()),
        )
        self._checkpointer = ocp.Checkpointer(
            ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
        )

    def add(self, path: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"ParamWriter.add({path!r}): expected a numpy array, got {type(array).__name__}"
            )
        self.reserve(array.nbytes)
        self._pending[path] = array
        self._pending_bytes += array.nbytes

    def reserve(self, nbytes: int) -> None:
        """Write the pending group now if `nbytes` more would overflow it, so a group never
        exceeds the budget unless one tensor alone does. Call before building the next
        tensor and it never shares memory with a group being written."""
        if self._pending and self._pending_bytes + nbytes > self.group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._checkpointer.save(
            self.root / f"{len(self.groups):05d}", args=ocp.args.PyTreeSave(_nest(self._pending))
        )
        self.groups.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0
        _release_freed_memory()

    def close(self) -> None:
        self._flush()
        self._checkpointer.close()
        (self.root / MANIFEST_NAME).write_text(json.dumps({"groups": self.groups}) + "\n")


def save_params(directory: Path, params: dict) -> None:
    """Write a nested dict of numpy/jax arrays (dtypes kept)."""
    writer = ParamWriter(directory)
    for path, array in flatten(params).items():
        writer.add(path, np.asarray(array))
    writer.close()


def restore_params(
    directory: Path, template: dict, shardings: dict[str, Any] | None = None
) -> dict:
    """Nested dict shaped like `template` (ShapeDtypeStruct leaves) of device arrays, read group by group.

    Stored arrays are cast to the template's dtypes. `shardings` ({path: Sharding}, every
    path) restores each array straight into its sharding: every device reads only its
    own shard, and no parameter is ever whole on one device.
    """
    root = (Path(directory) / PARAMS_DIR).absolute()
    targets = flatten(template)
    if shardings is not None:
        targets = {
            p: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=shardings[p])
            for p, t in targets.items()
        }
    groups = _read_manifest(root)
    unknown = sorted({p for g in groups for p in g} - set(targets))
    missing = sorted(set(targets) - {p for g in groups for p in g})
    if unknown or missing:
        raise CheckpointError(
            f"{root / MANIFEST_NAME}: checkpoint does not match the model config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unknown[:5]}; {RECONVERT}"
        )
    flat: dict[str, Any] = {}
    _silence_late_read_callbacks()  # before reading: a late callback can race the except below
    with ocp.StandardCheckpointer() as checkpointer:
        for i, paths in enumerate(groups):
            group = root / f"{i:05d}"
            try:
                restored = checkpointer.restore(group, _nest({p: targets[p] for p in paths}))
            except (
                Exception
            ) as e:  # orbax/tensorstore raise many types for one cause: damaged files
                reason = (
                    str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                )
                raise CheckpointError(
                    f"{group} cannot be restored ({reason}); {RECONVERT}"
                ) from None
            if shardings is not None:
                flat.update(flatten(restored))
                continue
            # Without shardings orbax hands back host numpy arrays, most not 64-byte aligned:
            # as jit arguments they would be copied to the device on every call (the whole
            # model per generate call). Placing them once here, a group at a time, keeps the
            # host peak at a group.
            flat.update(jax.device_put(flatten(restored)))
    return unflatten_into(template, flat)


def _is_closed_loop_callback(unraisable) -> bool:
    exc = unraisable.exc_value
    frames = (
        [f.filename for f in traceback.extract_tb(exc.__traceback__)] if exc is not None else []
    )
    return (
        isinstance(exc, RuntimeError)
        and str(exc) == "Event loop is closed"
        and any("asyncio" in f for f in frames)
    )


class _OrphanedReadFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax reads orphaned by a
    failed restore (the failure itself was already raised as a CheckpointError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            not str(record.msg).startswith("Task exception was never retrieved")
            or not record.exc_info
        ):
            return True
        frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info[2] else []
        from_reader = any("orbax" in f.filename or "tensorstore" in f.filename for f in frames)
        # tensorstore's own futures carry no Python frames; their errors name the database.
        return not (from_reader or "OCDBT database" in str(record.exc_info[1]))


def _silence_late_read_callbacks() -> None:
    """After a failed restore, tensorstore reads still in flight finish later: they post to
    orbax's already closed event loop (Python prints each RuntimeError as an "unraisable"
    traceback) and leave failed tasks nobody awaits (asyncio logs each). Drop exactly those;
    every other unraisable exception and asyncio error is still shown."""
    previous = sys.unraisablehook
    if getattr(previous, "_zspa_filter", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook._zspa_filter = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrphanedReadFilter())


def _read_manifest(root: Path) -> list[list[str]]:
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing: the checkpoint is incomplete; {RECONVERT}")
    try:
        groups = json.loads(manifest.read_text())["groups"]
        if not all(isinstance(g, list) and all(isinstance(p, str) for p in g) for g in groups):
            raise TypeError("groups must be lists of parameter paths")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{manifest} cannot be read ({type(e).__name__}: {e}); {RECONVERT}"
        ) from None
    return groups


def with_dtype(cfg, dtype: str):
    """`cfg` with every component's parameter/compute dtype set to `dtype` ("bfloat16", ...)."""
    changes = {
        f.name: dataclasses.replace(getattr(cfg, f.name), dtype=dtype)
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, f.name)) and hasattr(getattr(cfg, f.name), "dtype")
    }
    return dataclasses.replace(cfg, **changes)


def restore_model(directory: Path, cfg, model_cls, shardings: dict[str, Any] | None = None):
    """Restore params straight into an abstract model's tree (no random init); dtypes are
    `cfg`'s (the stored arrays are cast), `shardings` as in `restore_params`."""
    model = abstract_model(cfg, model_cls)
    graphdef, state = nnx.split(model)
    restored = restore_params(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
