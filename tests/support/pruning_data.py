"""Random visual/prompt embeddings for the pruning tests, and checks on kept indices."""

from __future__ import annotations

import numpy as np


def make_data(seed: int, b: int, n: int, t: int, d: int, kind: str = "gauss"):
    """numpy f32 visual [B,N,D], prompt [B,T,D], bool mask [B,T] (~30% masked)."""
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        v = rng.standard_normal((b, n, d))
    elif kind == "clustered":  # a few tight clusters: diversity decides which cluster is next
        # (within-cluster cosine ~0.99. Much tighter clusters (noise 0.05, cosines within
        # ~1e-4 of each other) produced a genuine 1-ulp near-tie in relevance, 4.4e-8 apart
        # in float64, that f32 JAX and f32 torch legitimately order differently.)
        n_clusters = int(rng.integers(2, 6))
        centers = rng.standard_normal((b, n_clusters, d)) * 3.0
        assign = rng.integers(0, n_clusters, (b, n))
        v = np.take_along_axis(centers, assign[..., None], axis=1) + 0.3 * rng.standard_normal(
            (b, n, d)
        )
    else:
        raise ValueError(kind)
    v = v * rng.uniform(0.2, 5.0, (b, n, 1))  # varied norms
    p = rng.standard_normal((b, t, d))
    if kind == "clustered":  # prompt near one cluster so relevance is meaningful
        p = p * 0.3 + v[:, :1, :]
    m = rng.random((b, t)) < 0.7
    if seed % 5 == 0:
        m[0, :] = False  # an all-masked row now and then
    return v.astype(np.float32), p.astype(np.float32), m


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if not np.array_equal(a, b):
        rows = np.nonzero((a != b).any(axis=1))[0]
        raise AssertionError(
            f"{what}: rows {rows.tolist()} differ\njax   {a[rows]}\ntorch {b[rows]}"
        )


def check_valid(idx: np.ndarray, b: int, n: int, k: int) -> None:
    assert idx.shape == (b, k)
    assert (idx >= 0).all() and (idx < n).all()
    assert (np.diff(idx, axis=1) > 0).all()  # strictly ascending => unique
