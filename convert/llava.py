"""Convert a Hugging Face LLaVA checkpoint into a zspa_jax checkpoint.

    python -m convert.llava SRC OUT [--dtype float32|bfloat16] [--force]

SRC is a local HF directory (config.json + safetensors + tokenizer/processor files) or a
hub id. Tensors are streamed one at a time, each read in blocks of rows; every mapping
problem is collected and reported together; OUT is written to a temporary sibling and
renamed into place, so a failed conversion leaves nothing behind. The machinery is
`convert.core`; this module contributes LLaVA's config reader and key table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from convert import core
from convert.core import (  # noqa: F401  (re-exported: the LLaVA converter's public names)
    BLOCK_BYTES,
    SUPPORTED_DTYPES,
    ConversionError,
    FamilySpec,
    Step,
    check_out,
    load_hf_config,
    load_tensor,
    resolve_source,
    write_params,
)
from convert.hf_config import llava_config_from_hf
from convert.keymap import SKIPPED, map_key
from convert.safetensors_io import SafetensorsCheckpoint
from models.llava import LlavaForConditionalGeneration

SPEC = FamilySpec(
    name="llava",
    model_cls=LlavaForConditionalGeneration,
    config_from_hf=llava_config_from_hf,
    map_key=map_key,
    skipped=SKIPPED,
)
PROCESSOR_FILES = SPEC.processor_files


def plan_conversion(checkpoint: SafetensorsCheckpoint, template: dict) -> list[Step]:
    """Match every HF LLaVA tensor to a parameter of `template`; see `convert.core.plan_conversion`."""
    return core.plan_conversion(checkpoint, template, SPEC)


def convert(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Convert SRC into OUT; returns a summary dict. Leaves OUT untouched on failure."""
    return core.convert(SPEC, src, out, dtype=dtype, force=force, progress=progress)


def main(argv: list[str] | None = None) -> int:
    return core.main(SPEC, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
