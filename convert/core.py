"""Family-agnostic conversion machinery shared by `convert.llava` and `convert.qwen2_5_vl`.

A family supplies a `FamilySpec`: how to read its transformers config into our config
dataclass, its key table (HF tensor name -> our parameter path + transform), and the
processor files to copy. Everything else lives here: resolving SRC (local directory or
hub id), reading the transformers config in a child process, planning the mapping with
every problem reported together, streaming tensors one at a time in row blocks into
grouped orbax checkpoints, and the atomic temp-dir + rename write of OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from convert.hf_config import UnsupportedConfigError
from convert.keymap import Transform
from convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from models.checkpoint import CONFIG_NAME, ParamWriter, flatten, param_template, write_config
from models.layers import DTYPES

# Files that let `AutoProcessor.from_pretrained(OUT)` rebuild the HF processor.
COMMON_PROCESSOR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
SUPPORTED_DTYPES = ("float32", "bfloat16")
BLOCK_BYTES = 16 * 2**20  # source bytes read at a time


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What one model family contributes to the shared converter."""

    name: str  # the family's name, recorded in zspa_config.json (zspa_jax.families looks it up)
    model_cls: type  # the family's NNX model (its parameter tree is the conversion target)
    config_from_hf: Callable[
        ..., Any
    ]  # (transformers config dict, dtype=) -> our config; UnsupportedConfigError
    map_key: Callable[
        [str], tuple[str, Transform] | None
    ]  # HF tensor name -> (our path, transform)
    skipped: re.Pattern  # buffers that are recomputed, never learned
    head_prefix: str = "language_model.lm_head."  # our path of an untied head (dropped when tied)
    processor_files: tuple[str, ...] = COMMON_PROCESSOR_FILES


def resolve_source(src: str) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (config, weights, processor)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"SRC {src!r} is a file; expected a directory or a hub id")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise ConversionError(
            f"SRC {src!r} is neither an existing directory nor a hub id like 'org/name'"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ConversionError(
            f"SRC {src!r} is not a local directory and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
            "download it on a connected machine and pass the directory"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except Exception as e:  # network errors come in many types; the message is what matters
        raise ConversionError(
            f"could not download {src!r} from the hub: {type(e).__name__}: {e}"
        ) from None


# Read in a child process: transformers pulls in torch, whose ~250 MiB would otherwise stay
# resident for the whole conversion; the child exits once the (defaults-filled) dict is out.
_READ_CONFIG = (
    "import sys\n"
    "from transformers import AutoConfig\n"
    "sys.stdout.write(AutoConfig.from_pretrained(sys.argv[1]).to_json_string(use_diff=False))\n"
)


def load_hf_config(src: Path) -> dict:
    """config.json as transformers reads it (with the defaults a sparse hub config leaves out)."""
    if not (src / "config.json").exists():
        raise ConversionError(f"{src}: config.json is missing")
    child = subprocess.run(
        [sys.executable, "-c", _READ_CONFIG, str(src)], capture_output=True, text=True
    )
    if child.returncode != 0:
        lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {child.returncode}"
        raise ConversionError(f"{src}/config.json could not be read by transformers: {reason}")
    return json.loads(child.stdout)


def check_out(out: str | Path, force: bool) -> Path:
    """OUT as an absolute path, refused early (before any work) when it cannot be written:
    an existing OUT without --force, an existing OUT that is not a previous checkpoint
    (--force never replaces an ordinary file or directory), a parent that is a file."""
    out = Path(out).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"OUT {out} already exists; pass --force to replace it")
        if not (out.is_dir() and not out.is_symlink() and (out / CONFIG_NAME).is_file()):
            raise ConversionError(
                f"OUT {out} exists and is not a zspa_jax checkpoint directory; --force only replaces a "
                "previous checkpoint, never other files: choose another OUT or remove it yourself"
            )
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"cannot create OUT {out}: {ancestor} is a file, not a directory")
    return out


class Step(NamedTuple):
    key: str  # HF tensor name
    path: str  # our dotted parameter path
    transform: Transform
    shape: tuple[int, ...]  # our shape


def plan_conversion(
    checkpoint: SafetensorsCheckpoint, template: dict, spec: FamilySpec
) -> list[Step]:
    """Match every HF tensor to a parameter of `template` (nested ShapeDtypeStruct) with
    `spec`'s key table.

    Reads names and shapes only. Collects unmatched keys, shape mismatches and missing
    parameters, and raises one ConversionError listing all of them.
    """
    targets = flatten(template)
    plan: list[Step] = []
    claimed: set[str] = set()  # paths some tensor maps to, even a wrongly shaped one
    errors: list[str] = []
    tied = not any(path.startswith(spec.head_prefix) for path in targets)
    for key in checkpoint.keys():
        if spec.skipped.search(key):
            continue
        mapped = spec.map_key(key)
        if mapped is None:
            errors.append(f"unexpected tensor {key!r} {checkpoint.shape(key)}: no rule maps it")
            continue
        path, transform = mapped
        if path not in targets:
            if tied and path.startswith(spec.head_prefix):
                continue  # a tied head saved explicitly: the embedding table is the head
            errors.append(f"tensor {key!r} maps to {path!r}, which the model does not have")
            continue
        if path in claimed:
            errors.append(f"tensor {key!r} maps to {path!r}, already filled by another tensor")
            continue
        claimed.add(path)
        want = tuple(targets[path].shape)
        got = transform.target_shape(checkpoint.shape(key))
        if got != want:
            errors.append(
                f"tensor {key!r}: shape {checkpoint.shape(key)} -> {got}, expected {want} for {path!r}"
            )
            continue
        plan.append(Step(key, path, transform, want))
    missing = sorted(set(targets) - claimed)
    errors.extend(
        f"parameter {p!r} {tuple(targets[p].shape)} has no tensor in the checkpoint"
        for p in missing
    )
    if errors:
        raise ConversionError(
            f"{len(errors)} problem(s) mapping the checkpoint:\n  " + "\n  ".join(errors)
        )
    return plan


def load_tensor(
    checkpoint: SafetensorsCheckpoint, step: Step, dtype, block_bytes: int = BLOCK_BYTES
) -> np.ndarray:
    """One parameter in our layout and `dtype`, built block by block from the source: the
    only full-size array is the result."""
    out = np.empty(step.shape, dtype)
    for start, rows in checkpoint.row_blocks(step.key, block_bytes):
        step.transform.write_rows(out, start, rows)
    return out


def write_params(
    checkpoint: SafetensorsCheckpoint,
    plan: list[Step],
    dtype,
    directory: Path,
    progress: bool = True,
) -> None:
    """Stream tensors one at a time: map, transform, cast, hand to the grouped writer."""
    writer = ParamWriter(directory)
    itemsize = np.dtype(dtype).itemsize
    for step in tqdm(plan, desc="converting", unit="tensor", disable=not progress):
        writer.reserve(
            int(np.prod(step.shape)) * itemsize
        )  # write the full group before building the next tensor
        writer.add(step.path, load_tensor(checkpoint, step, dtype))
    writer.close()


def convert(
    spec: FamilySpec,
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Convert SRC into OUT with `spec`; returns a summary dict. Leaves OUT untouched on failure."""
    if dtype not in SUPPORTED_DTYPES:
        raise ConversionError(
            f"--dtype {dtype!r} is not supported; expected one of {SUPPORTED_DTYPES}"
        )
    out = check_out(out, force)
    start = time.perf_counter()
    src_dir = resolve_source(str(src))
    try:
        cfg = spec.config_from_hf(load_hf_config(src_dir), dtype=dtype)
    except UnsupportedConfigError as e:
        raise ConversionError(f"{src_dir}: {e}") from None
    try:
        checkpoint = SafetensorsCheckpoint(src_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    plan = plan_conversion(checkpoint, param_template(cfg, spec.model_cls), spec)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ConversionError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become OUT's mode
        write_params(checkpoint, plan, DTYPES[dtype], tmp, progress=progress)
        write_config(tmp, spec.name, cfg, extra={"source": str(src), "dtype": dtype})
        copied = [name for name in spec.processor_files if (src_dir / name).exists()]
        for name in copied:
            shutil.copy2(src_dir / name, tmp / name)
        if out.exists():  # --force: swap in the new checkpoint, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(
            f"writing {out} failed ({e.strerror or e}); nothing was written"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    parameters = int(sum(np.prod(step.shape) for step in plan))
    return {
        "out": str(out),
        "parameters": parameters,
        "bytes": parameters * np.dtype(DTYPES[dtype]).itemsize,
        "tensors": len(plan),
        "dtype": dtype,
        "seconds": time.perf_counter() - start,
        "processor_files": copied,
    }


def main(spec: FamilySpec, argv: list[str] | None = None, description: str = "") -> int:
    """The `python -m convert.<family> SRC OUT [--dtype] [--force]` command line."""
    parser = argparse.ArgumentParser(prog=f"python -m convert.{spec.name}", description=description)
    parser.add_argument(
        "src", metavar="SRC", help=f"local Hugging Face {spec.name} directory or hub id"
    )
    parser.add_argument(
        "out", metavar="OUT", help="output directory (must not exist unless --force)"
    )
    parser.add_argument(
        "--dtype",
        choices=SUPPORTED_DTYPES,
        default="float32",
        help="parameter dtype (default float32)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        s = convert(
            spec, args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet
        )
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"converted {s['tensors']} tensors, {s['parameters']:,} parameters ({s['dtype']}, "
        f"{s['bytes'] / 2**20:.1f} MiB) in {s['seconds']:.1f} s -> {s['out']}"
    )
    return 0
