"""Visual-token pruning methods: one record (`Method`) per method, one module per method.

To add a method, write its module (a `Method` value with its select and FLOPs functions,
its capabilities and its hyperparameters as `Option` records) and list it in `_RECORDS`
below; everything else (PruneConfig, select_tokens, the families' support checks, the
pipeline, estimate, the command lines and the lmms-eval model arguments) reads the record.
"""

from __future__ import annotations

from zspa_jax.methods import baselines, cdpruner, dart, fastv, pool, visionzip, vispruner, zspaprune
from zspa_jax.methods.base import (
    ClsTower,
    LayerInputs,
    Method,
    MethodInputs,
    Option,
    OptionValues,
    Selection,
)

_RECORDS = (
    zspaprune.ZSPAPRUNE,
    zspaprune.RELEVANCE,
    zspaprune.DIVPRUNE,
    baselines.RANDOM,
    baselines.UNIFORM,
    cdpruner.METHOD,
    vispruner.METHOD,
    visionzip.METHOD,
    fastv.METHOD,
    dart.METHOD,
    pool.METHOD,
)
METHODS: dict[str, Method] = {m.name: m for m in _RECORDS}

__all__ = [
    "METHODS",
    "ClsTower",
    "LayerInputs",
    "Method",
    "MethodInputs",
    "Option",
    "OptionValues",
    "Selection",
    "get_method",
]


def get_method(name: str) -> Method:
    """The record of method `name`; a ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}") from None
