"""The family record: everything the generic path needs to know about one model family.

A family is one models/ file (config + NNX modules), one convert/ table and one package
in zspa_jax/families/ (its record, host adapter and layout, estimate hooks, processor),
listed once in `zspa_jax.families`. Loading reads the family name from the checkpoint and
looks the record up; forward, generate, the pipeline and sharding only call the record,
the adapter protocol (`HostAdapter`, below; the shared host rules are zspa_jax.host) and
the model protocol (models.protocol).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from zspa_jax.host import FamilyLayout, Spans

__all__ = ["Family", "HostAdapter"]


class HostAdapter(Protocol):
    """A family's host side: its checks, its spans and its arrays' layout (numpy, before any
    compile) and its processor. The rules every family shares (placeholders pruning drops,
    slot padding, the prompt bucket, the position budget) are zspa_jax.host's."""

    def spans(
        self, vlm, input_ids, pixel_values, attention_mask, extras: dict, prune, bucket: bool
    ) -> Spans:
        """Check the arrays and say how many placeholders each image or video of each row
        takes. `extras`: the family's other visual arrays by name (`Family.visual_args`);
        `prune`: for the family's own refusals (e.g. a method its layout cannot serve);
        `bucket`: pad the family's image-dependent shapes to buckets."""

    def layout(
        self, vlm, spans: Spans, input_ids, attention_mask, slots: int | None
    ) -> FamilyLayout:
        """The family's arrays for the final (slot- and left-padded) ids: pixels, aux pytree,
        grids and, where the family numbers positions itself, each row's next position.
        `slots`: each row's placeholder slots when laid out for pruning, else None."""

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
    # an image's visual tokens form a 2-D grid (what the grid-reading methods need)
    grid_tokens: bool = True
    tokens_per_image: Callable[[Any], int | None] = lambda cfg: None  # fixed N per image, or None
    # The visual arrays besides pixel_values it takes, by transformers' names (what forward,
    # generate and encode accept and pass on), and which of them are video
    visual_args: tuple[str, ...] = ()
    video_args: tuple[str, ...] = ()
    estimate: Any = None  # the family's estimate hooks (zspa_jax.estimate.EstimateHooks)

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
