"""Helpers shared by the method kernels (float32, exact-f32 dots, unit vectors, prompt mean)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

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


def default_batching() -> str:
    """How the kernels map over the batch. Measured (benchmarks/pruning.py): on CPU a
    sequential lax.map keeps one example's [N, D] tokens cache-resident across the K fill
    steps and beats vmap; accelerators want the parallel batched form."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def batched(fn, args: tuple, batching: str):
    """Run a per-example `fn(*args_b)` over the leading axis with vmap or a sequential lax.map.

    Under a mesh with a "data" axis (jax.set_mesh) that divides the batch, each device
    runs the examples it holds (shard_map), so selection never gathers the batch.
    """
    if batching == "vmap":
        run = lambda *a: jax.vmap(fn)(*a)  # noqa: E731
    elif batching == "map":
        run = lambda *a: lax.map(lambda x: fn(*x), a)  # noqa: E731
    else:
        raise ValueError(f"batching must be 'vmap' or 'map', got {batching!r}")
    mesh = jax.sharding.get_abstract_mesh()
    data = 1 if mesh.empty or "data" not in mesh.axis_names else mesh.shape["data"]
    if data > 1 and all(x.shape[0] % data == 0 for x in jax.tree.leaves(args)):
        return jax.shard_map(run, in_specs=P("data"), out_specs=P("data"), check_vma=False)(*args)
    return run(*args)
