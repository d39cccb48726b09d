"""XLA's own cost analysis of a compiled program."""

from __future__ import annotations

import jax


def xla_flops(fn, *args) -> float:
    """XLA's FLOP count of jit(fn) compiled for these (abstract) arguments."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])
