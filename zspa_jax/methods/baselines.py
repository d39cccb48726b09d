"""Data-blind baselines: a uniformly random K-subset, and an evenly spaced grid of K tokens."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zspa_jax.methods.base import Method, MethodInputs, Selection, no_flops

__all__ = ["RANDOM", "UNIFORM"]


@partial(jax.jit, static_argnames=("b", "n", "keep"))
def random_subset(
    rng: jax.Array, b: int, n: int, keep: int, valid: jax.Array | None = None
) -> jax.Array:
    """int32 [B, keep]: a uniformly random K-subset per row (top-K of iid uniforms), sorted;
    masked slots rank below every real token."""
    u = jax.random.uniform(rng, (b, n))
    if valid is not None:
        u = jnp.where(valid, u, -1.0)
    return jnp.sort(lax.top_k(u, keep)[1], axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("keep",))
def _uniform_masked(valid: jax.Array, keep: int) -> jax.Array:
    # floor((i + 0.5) * N_b / K) over each row's real tokens, mapped to their positions.
    n_b = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.int32)
    rank = ((2 * jnp.arange(keep, dtype=jnp.int32)[None] + 1) * n_b) // (2 * keep)
    real_positions = jnp.argsort(~valid, axis=1, stable=True)  # real tokens first, in order
    return jnp.take_along_axis(real_positions, rank, axis=1).astype(jnp.int32)


def uniform_indices(b: int, n: int, keep: int, valid: jax.Array | None = None) -> jax.Array:
    """int32 [B, keep]: floor((i + 0.5) * N_b / K) over each row's N_b real tokens."""
    if valid is not None:
        return _uniform_masked(valid, keep)
    idx = ((2 * np.arange(keep) + 1) * n) // (2 * keep)  # == floor((i + 0.5) * N / K), exactly
    return jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (b, keep))  # a constant: no compile


def _random(inputs: MethodInputs, *, keep: int, batching: str) -> Selection:
    b, n = inputs.visual.shape[:2]
    return Selection(random_subset(inputs.rng, b, n, keep, inputs.valid))


def _uniform(inputs: MethodInputs, *, keep: int, batching: str) -> Selection:
    b, n = inputs.visual.shape[:2]
    return Selection(uniform_indices(b, n, keep, inputs.valid))


RANDOM = Method(
    name="random",
    stage="embedding",
    select=_random,
    flops=no_flops,
    summary="a uniformly random K-subset per row (from the rng), sorted",
    needs_rng=True,
)
UNIFORM = Method(
    name="uniform",
    stage="embedding",
    select=_uniform,
    flops=no_flops,
    summary="evenly spaced tokens: floor((i + 0.5) N / K) for i = 0..K-1",
)
