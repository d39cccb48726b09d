"""The user's images as the families' processors take them: one list per prompt, 8-bit RGB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["images_per_prompt", "to_rgb"]


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
