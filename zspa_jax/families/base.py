"""The family record: everything the generic path needs to know about one model family.

A family is one models/ file (config + NNX modules), one convert/ table and one record
here (its host adapter, capabilities and converter), listed once in
`zspa_jax.families`. Loading reads the family name from the checkpoint and looks the
record up; forward, generate, the pipeline and sharding only call the record and the
model protocol (models.protocol).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from zspa_jax.validation import check_binary_mask, is_traced


class HostBatch(NamedTuple):
    """A validated batch as the jitted programs take it (what an adapter's `prepare` returns)."""

    input_ids: Any  # int [B, L] (numpy, or the caller's arrays where the family allows tracing)
    attention_mask: Any  # int [B, L] or None (all real)
    pixel_values: np.ndarray | None
    aux: Any  # the family's pytree for `multimodal_inputs` (None when it needs none)
    num_visual: int  # placeholder slots per row N (the visual layout), 0 without images
    min_visual: int  # fewest real visual tokens in a row (what a prune ratio applies to)
    prompt_tokens: (
        np.ndarray | None
    )  # int [B]: real prompt tokens per row before any padding (None if traced)
    visual_per_row: np.ndarray | None = (
        None  # int [B]: real visual tokens per row (None: num_visual each)
    )
    image_grid: np.ndarray | None = (
        None  # int [B, I, 2]: each image's token grid (rows, cols), when grids
    )
    rows: int | None = (
        None  # the caller's rows when the batch was padded for a mesh (None: not padded)
    )
    images_per_row: np.ndarray | None = (
        None  # int [B]: images in each row (None: unknown, e.g. traced)
    )
    min_image_visual: int = (
        0  # fewest real visual tokens of one image (what a per-image ratio applies to)
    )
    # Tower-stage methods on a family whose tower rows are not its images (LLaVA-NeXT's crops):
    # the tower rows of each row, each keeping K (0: K per image, or per row)
    tower_rows_per_row: int = 0


class HostAdapter(Protocol):
    """A family's host side: checks, layouts and the processor (numpy, before any compile)."""

    def prepare(
        self,
        vlm,
        input_ids,
        pixel_values,
        attention_mask,
        extras: dict,
        prune,
        extra_length: int,
        bucket: bool,
        prompt_bucket: Callable[[int], int] | None,
    ) -> HostBatch:
        """`extras`: the family's other visual arrays by name (those in `Family.visual_args`).
        `prompt_bucket`: left-pad each prompt to the length it gives (`left_pad`)."""

    def last_row_arrays(self, vlm, ids: np.ndarray, extras: dict) -> dict[str, int]:
        """How many trailing entries of pixel_values and of each extra belong to the batch's
        last row (mesh padding repeats them)."""

    def encode(self, vlm, prompts, images, chat_template, videos=None) -> dict[str, np.ndarray]:
        """Strings + images (+ videos where the family takes them) -> the array API's arrays."""

    def load_processor(self, path: Path) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    name: str  # recorded in the checkpoint
    display_name: str
    config_cls: type
    model_cls: type  # implements models.protocol; carries SHARDING_RULES
    adapter: HostAdapter
    converter: str  # the module run as `python -m <converter> SRC OUT`
    has_cls: bool  # the tower has a [CLS] token (the tower-stage methods need it)
    variable_tokens: bool  # rows carry different numbers of visual tokens (a valid mask)
    grid_tokens: bool = (
        True  # an image's visual tokens form a 2-D grid (what the grid-reading methods need)
    )
    tokens_per_image: Callable[[Any], int | None] = lambda cfg: None  # fixed N per image, or None
    visual_args: tuple[
        str, ...
    ] = ()  # the visual arrays besides pixel_values it takes (transformers' names)
    estimate: Any = None  # the family's estimate hooks (zspa_jax.estimate)

    @property
    def sharding_rules(self):
        return self.model_cls.SHARDING_RULES

    def check_method(self, prune, model=None) -> None:
        """Refuse, by name, a method whose needs this family (and, given, this `model`)
        does not meet, before any compile. The model's own check of its tower
        (`cls_feature_index`, models.protocol) says why; the message names the method."""
        if prune is None:
            return
        method = prune.record
        if method.needs_cls_attention and not self.has_cls:
            raise ValueError(
                f"method {method.name!r} needs the vision tower's [CLS] attention; {self.display_name}'s tower has "
                "no [CLS] token"
            )
        if method.needs_cls_attention and model is not None:
            try:
                model.cls_feature_index()
            except ValueError as e:
                raise ValueError(
                    f"method {method.name!r} needs the vision tower's [CLS] attention at its "
                    f"feature layer: {e}"
                ) from None
        if method.needs_grid and not self.grid_tokens:
            raise ValueError(
                f"method {method.name!r} reads each image's visual tokens as a 2-D grid; {self.display_name}'s are not "
                "one (e.g. a base view followed by a crop grid with row newlines)"
            )
        if (
            self.variable_tokens
            and not method.accepts_mask
            and not (method.needs_cls_attention and self.has_cls)
        ):
            # (tower-stage methods run on whole tower rows, which need no mask)
            raise ValueError(
                f"method {method.name!r} is not implemented for {self.display_name} (variable-size images): it "
                "takes no mask over each row's real visual tokens"
            )


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def prompt_bucket(length: int) -> int:
    """The length a prompt of `length` tokens is left-padded to, so that prompts of nearby
    lengths share compiled programs: the next multiple of 16 up to 256 tokens, of 32 up to
    512, of 64 beyond. A short (e.g. pruned) prompt pays at most 15 padding slots, a longer
    one under 1/8 of its length, and never more than 64-token steps would add; 48 buckets
    up to 2048 tokens."""
    length = max(int(length), 1)
    return round_up(length, 16 if length <= 256 else 32 if length <= 512 else 64)


def left_pad(
    ids: np.ndarray, mask: np.ndarray, bucket: Callable[[int], int], pad_id: int, dropped: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad [B, L] ids (pad_id) and mask (0) so that L - `dropped` becomes
    `bucket(L - dropped)` (e.g. `prompt_bucket`: fewer compiles). `dropped`: the
    placeholders pruning removes before the LLM (N - K), so a pruned prompt is padded to its
    own length's bucket, not the unpruned one's."""
    extra = bucket(ids.shape[1] - dropped) - (ids.shape[1] - dropped)
    if not extra:
        return ids, mask
    return np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(
        mask, ((0, 0), (extra, 0))
    )


def pad_visual_slots(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_id: int | tuple[int, ...],
    slots: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Give every row exactly `slots` placeholders (the visual layout of models.protocol).

    `token_id`: the placeholder id, or several (image and video). The added slots (the id of
    the row's last real placeholder, mask 0) go right after it, so each row's real
    placeholders come first, in reading order; they are masked out of attention and skipped
    by positions. Rows are re-left-padded to one length. Returns (input_ids,
    attention_mask) int32 [B, L'].
    """
    ids_of = (token_id,) if isinstance(token_id, (int, np.integer)) else tuple(token_id)
    rows_ids, rows_mask = [], []
    for ids, mask in zip(input_ids, attention_mask):
        real = np.flatnonzero(np.isin(ids, ids_of) & (mask != 0))
        at = real[-1] + 1 if real.size else ids.size
        fill = ids[real[-1]] if real.size else ids_of[0]
        extra = slots - real.size
        rows_ids.append(np.concatenate([ids[:at], np.full(extra, fill), ids[at:]]))
        rows_mask.append(np.concatenate([mask[:at], np.zeros(extra, mask.dtype), mask[at:]]))
    length = max(r.size for r in rows_ids)
    ids = np.stack([np.pad(r, (length - r.size, 0), constant_values=pad_id) for r in rows_ids])
    mask = np.stack([np.pad(r, (length - r.size, 0)) for r in rows_mask])
    return ids.astype(np.int32), mask.astype(np.int32)


def image_slot_index(tokens_per_image: list[list[int]], width: int | None = None) -> np.ndarray:
    """int32 [B, I, n]: for row b's image i, the slots [start, start + count) it holds among
    the row's placeholders (images follow each other in reading order); -1 pads images to
    n = max(count, width) and rows to I = the most images in a row."""
    images = max(len(r) for r in tokens_per_image)
    n = max([c for r in tokens_per_image for c in r] + [width or 0, 1])
    index = np.full((len(tokens_per_image), images, n), -1, np.int32)
    for b, counts in enumerate(tokens_per_image):
        start = 0
        for i, count in enumerate(counts):
            index[b, i, :count] = np.arange(start, start + count)
            start += count
    return index


def check_ids_and_mask(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """Host ids int [B, L] and a 0/1, left-padded mask (all ones when None)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"input_ids must be an integer array [batch, length], got shape {ids.shape} ({ids.dtype})"
        )
    if attention_mask is None:
        return ids, np.ones(ids.shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}"
        )
    check_binary_mask("attention_mask", mask)
    check_left_padded(mask)
    return ids, mask.astype(np.int32)


def check_left_padded(mask) -> None:
    if (np.asarray(mask)[:, -1] == 0).any():
        raise ValueError(
            "attention_mask must be left-padded: the last position of every row must be a real token"
        )


__all__ = [
    "Family",
    "HostAdapter",
    "HostBatch",
    "check_ids_and_mask",
    "check_left_padded",
    "is_traced",
    "image_slot_index",
    "images_per_prompt",
    "left_pad",
    "pad_visual_slots",
    "prompt_bucket",
    "round_up",
]


def images_per_prompt(
    images: Any, count: int, check: Callable[[Any, str], None], optional: bool = False
) -> list[list[Any]] | None:
    """`images` for `count` prompts as one list of images per prompt (reading order).

    Accepted: None; one image (one prompt); a list with one entry per prompt, each an image
    or a list of that prompt's images (with `optional`, also None or [] for a prompt without
    images, e.g. when videos are given). `check(image, name)` validates each one.
    """
    if images is None:
        return None
    entries = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(entries) != count:
        raise ValueError(
            f"got {count} prompt(s) but {len(entries)} image(s); give one entry per prompt: an image, or a list of "
            "that prompt's images" + (", or None" if optional else "")
        )
    groups = []
    for i, entry in enumerate(entries):
        several = isinstance(entry, (list, tuple))
        group = [] if entry is None and optional else (list(entry) if several else [entry])
        if not group and not optional:
            raise ValueError(
                f"images[{i}] is an empty list; give each prompt at least one image, or images=None"
            )
        for j, image in enumerate(group):
            check(image, f"images[{i}][{j}]" if several else f"images[{i}]")
        groups.append(group)
    return groups


def to_rgb(image: Any, name: str) -> Any:
    """A PIL image as 8-bit RGB for a processor; arrays pass through unchanged.

    16-bit greyscale ("I;16", "I;16B", "I;16L") is scaled to 8 bits (value / 257, rounded):
    PIL's own convert("RGB") would clip it at 255 and turn almost every pixel white. 32-bit
    integer ("I") and float ("F") images have no agreed range, so they are refused by name.
    """
    if not hasattr(image, "convert"):
        return image
    mode = getattr(image, "mode", "RGB")
    if mode.startswith("I;16"):
        from PIL import Image

        scaled = np.rint(np.asarray(image, np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode in ("I", "F"):
        raise ValueError(
            f"{name} is a PIL image of mode {mode!r} (32-bit {'integer' if mode == 'I' else 'float'} pixels) with no "
            "known range; convert it to 8-bit ('L' or 'RGB') first"
        )
    return image.convert("RGB")
