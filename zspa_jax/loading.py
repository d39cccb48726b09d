"""`load(path) -> VLM`: a converted checkpoint, its config and its HF processor."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from flax import nnx

from models.checkpoint import read_config, restore_model
from models.llava import LlavaConfig, LlavaForConditionalGeneration


@dataclasses.dataclass
class VLM:
    """A loaded vision-language model.

    `model` is the NNX module (handy for inspection and component calls); hot paths use
    `graphdef` + `state` under plain `jax.jit` (cheaper per call than `nnx.jit`).
    """

    config: LlavaConfig
    model: LlavaForConditionalGeneration
    processor: Any | None
    path: Path | None = None
    graphdef: Any = dataclasses.field(init=False, repr=False)
    state: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.model)

    @property
    def tokens_per_image(self) -> int:
        return self.config.image_seq_length


def load_processor(path: Path):
    """The HF processor saved beside the params, or None when the checkpoint has none."""
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoProcessor.from_pretrained(path)


def load(path: str | Path, *, processor: bool = True) -> VLM:
    """Load a checkpoint written by `python -m convert.llava`.

    Args:
      path: the converted directory (OUT of the converter).
      processor: also load the saved HF processor/tokenizer (if present).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    cfg = read_config(path)
    model = restore_model(path, cfg)
    return VLM(config=cfg, model=model, processor=load_processor(path) if processor else None, path=path)
