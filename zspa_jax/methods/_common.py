"""Helpers shared by the method kernels (float32, exact-f32 dots, unit vectors, prompt mean)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

EPS = 1e-6  # norm floor, as in ZSPAPrune's step 2
HIGHEST = lax.Precision.HIGHEST  # true f32 dots on GPU/TPU too


def unit(x: jax.Array) -> jax.Array:
    """x / max(|x|, EPS) along the last axis."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, EPS)


def prompt_relevance(vn: jax.Array, t: jax.Array, m: jax.Array) -> jax.Array:
    """Cosine of each unit token to the masked mean prompt: vn [N, D], t [T, D], m bool [T] -> [N].

    The prompt vector is ZSPAPrune's (mean of the real prompt rows; 0 when none is real).
    Signed zeros are folded to +0.0 so equal scores tie by index in top_k/argsort.
    """
    count = jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)
    p = jnp.sum(jnp.where(m[:, None], t, 0.0), axis=0) / count
    s = jnp.einsum("nd,d->n", vn, unit(p), precision=HIGHEST)
    return jnp.where(s == 0.0, 0.0, s)


def batched(fn, args: tuple, batching: str):
    """Run a per-example `fn(*args_b)` over the leading axis with vmap or a sequential lax.map."""
    if batching == "vmap":
        return jax.vmap(fn)(*args)
    if batching == "map":
        return lax.map(lambda a: fn(*a), args)
    raise ValueError(f"batching must be 'vmap' or 'map', got {batching!r}")
