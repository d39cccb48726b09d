"""The three key layouts of LLaVA checkpoints, and rewriting a checkpoint into one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

LAYOUTS = ("in_memory", "v5_saved", "hub_legacy")


def canonical_key(key: str) -> str:
    """Any of the three LLaVA layouts -> the in-memory layout (`model.vision_tower.*`, ...)."""
    rules = [
        (r"^model\.(vision_tower|language_model|multi_modal_projector)\.", r"model.\1."),
        (r"^lm_head\.", "lm_head."),
        (r"^vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    raise KeyError(f"unrecognised LLaVA key {key!r}")


def layout_key(key: str, layout: str) -> str:
    """In-memory key -> the same tensor's key in `layout`."""
    if layout == "in_memory":
        return key
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith("model.multi_modal_projector."):
        return key[len("model.") :]
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower.") :]
        return ("vision_tower.vision_model." if layout == "hub_legacy" else "vision_tower.") + rest
    raise KeyError(key)


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("model.vision_tower.") for k in keys):
        return "in_memory"
    if any(k.startswith("vision_tower.vision_model.") for k in keys):
        return "hub_legacy"
    if any(k.startswith("vision_tower.") for k in keys):
        return "v5_saved"
    raise ValueError("no vision tower keys found")


def safetensors_keys(directory) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.extend(fh.keys())
    return keys


def rewrite_layout(src, dst, layout: str) -> Path:
    """Copy the HF LLaVA dir `src` to `dst` with every safetensors key rewritten into `layout`
    (handles a sharded checkpoint's index too). Non-weight files are copied unchanged."""
    from safetensors.torch import load_file, save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    convert = lambda k: layout_key(canonical_key(k), layout)  # noqa: E731
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            save_file(
                {convert(k): v.contiguous() for k, v in tensors.items()},
                str(dst / f.name),
                {"format": "pt"},
            )
        elif f.name.endswith(".safetensors.index.json"):
            index = json.loads(f.read_text())
            index["weight_map"] = {convert(k): v for k, v in index["weight_map"].items()}
            (dst / f.name).write_text(json.dumps(index, indent=2))
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
    return dst
