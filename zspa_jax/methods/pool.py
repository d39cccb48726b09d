"""Pool: adaptive average pooling of the visual token grid (the plain downsampling baseline).

Paper: VTC-Bench, arXiv:2510.07143, which found that plain downsampling of the visual
tokens beats many published token-compression methods.
Windows: exactly those of PyTorch's `torch.nn.functional.adaptive_avg_pool2d`.

Per row, with the row's R x C token grid (its tokens are slots [0, R*C) in row-major
order; slots beyond are padding) and K kept tokens:
  1. output grid h' x w' with h' * w' = K: among the factor pairs (h', K / h') of K with
     h' <= R and w' <= C, the one minimising |log(h'/w') - log(R/C)|; ties go to the
     smaller h' (e.g. K = 12 on a 10 x 20 grid: 2 x 6 and 3 x 4 are equally far from
     1/2, so 2 x 6). The rule is evaluated in exact integer arithmetic (below), so ties
     are real ties, not float noise;
  2. output cell (i, j) covers input rows [floor(i R / h'), ceil((i + 1) R / h')) and
     columns [floor(j C / w'), ceil((j + 1) C / w')) (windows may overlap when h' does
     not divide R) and its token is the mean of the window's tokens;
  3. the pooled token takes its window's centre slot: row (r0 + r1 - 1) // 2, column
     (c0 + c1 - 1) // 2, slot = row * C + column. Because h' <= R and w' <= C, window
     starts and ends strictly increase, so the K slots are distinct and, in the output
     grid's row-major order, ascending.
K == R * C gives one-token windows: the tokens themselves at slots 0..K-1.

A row where no factor pair fits (K = 29 on 24 x 24 has only 1 x 29 and 29 x 1; or
K > R * C) is an error: `check_pool_grid` raises for it on the host. (Inside jit such a
row gets some factor pair of K; its result is unspecified.)

Exact choice with traced grids: since h' w' = K, h'/w' = h'^2 / K and the cost is
|log(h'^2 C / (K R))|: decreasing in h' while h'^2 C <= K R, increasing after. So the
best fitting pair is h_lo (largest fitting h' with h'^2 C <= K R) or h_hi (smallest
fitting h' above), and h_lo wins iff K R <= h_lo h_hi C. Every product is at most
R^2 C, so int32 is exact while R^2 C < 2^31 (checked by `check_pool_grid`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zspa_jax.methods._common import HIGHEST
from zspa_jax.methods.base import Method, MethodInputs, Selection

__all__ = ["METHOD", "check_pool_grid", "factor_pairs", "pool_flops", "pool_tokens"]

_INT32_LIMIT = 2**31


def factor_pairs(keep: int) -> list[tuple[int, int]]:
    """All (h', w') with h' * w' = keep, ascending h'."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return [(h, keep // h) for h in range(1, keep + 1) if keep % h == 0]


def check_pool_grid(grid: np.ndarray, keep: int, *, n: int | None = None) -> None:
    """Host-side check of int [B, 2] (rows, cols) grids for pooling to `keep` tokens.

    Raises ValueError naming the first bad row when a grid is not positive, holds more
    than n slots (when n, the padded span length, is given), is too large for exact
    int32 arithmetic (rows^2 * cols >= 2^31) or has no factor pair h' x w' = keep with
    h' <= rows and w' <= cols.
    """
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.shape[1] != 2:
        raise ValueError(f"grid must be [B, 2] (rows, cols), got shape {grid.shape}")
    pairs = factor_pairs(keep)
    for b, (rows, cols) in enumerate(grid.tolist()):
        if rows < 1 or cols < 1:
            raise ValueError(f"pool: row {b} has grid {rows} x {cols}; rows and cols must be >= 1")
        if n is not None and rows * cols > n:
            raise ValueError(
                f"pool: row {b} has grid {rows} x {cols} = {rows * cols} tokens but only {n} slots"
            )
        if rows * rows * cols >= _INT32_LIMIT:
            raise ValueError(
                f"pool: row {b} has grid {rows} x {cols}, too large (rows^2 * cols >= 2^31)"
            )
        if not any(h <= rows and w <= cols for h, w in pairs):
            options = ", ".join(f"{h} x {w}" for h, w in pairs)
            raise ValueError(
                f"pool: row {b} has grid {rows} x {cols} and keep={keep}, but no factor pair of {keep} "
                f"({options}) fits inside it"
            )


def _output_shape(rows: jax.Array, cols: jax.Array, keep: int) -> tuple[jax.Array, jax.Array]:
    """(h', w') int32 [B] per row by the rule of the module docstring (traced rows, cols [B])."""
    hs = jnp.asarray([h for h, _ in factor_pairs(keep)], jnp.int32)  # [P], ascending
    ws = keep // hs
    r, c = rows[:, None], cols[:, None]
    fits = (hs <= r) & (ws <= c)  # [B, P]
    allowed = jnp.where(
        jnp.any(fits, axis=1, keepdims=True), fits, True
    )  # no fit: unspecified pair
    hm = jnp.where(allowed, hs, 0)  # masked before multiplying: no int32 overflow from unfit pairs
    below = allowed & (hm * hm * c <= keep * r)
    h_lo = jnp.max(jnp.where(below, hs, 0), axis=1)  # 0: none
    h_hi = jnp.min(jnp.where(allowed & ~below, hs, keep + 1), axis=1)  # keep + 1: none
    has_lo, has_hi = h_lo > 0, h_hi <= keep
    pick_lo = has_lo & (~has_hi | (keep * rows <= h_lo * jnp.where(has_hi, h_hi, 1) * cols))
    h = jnp.where(pick_lo, h_lo, h_hi)
    return h, keep // h


def pool_tokens(visual, grid, *, keep: int, visual_valid=None) -> tuple[jax.Array, jax.Array]:
    """visual: [B, N, D] (any float dtype; computed in f32, returned f32): each row's visual tokens in reading (row-major) order;
    grid: int32 [B, 2] = (rows, cols) of each row's token grid; the grid's tokens are slots [0, rows*cols) of the row (rows*cols <= N; slots beyond are padding);
    keep: K (static);
    returns (tokens f32 [B, K, D] pooled means, in row-major order of the output grid; slots int32 [B, K] the centre slots, ascending).

    visual_valid: optional bool [B, N], further real-slot mask; a slot counts only if it is
    in the grid and valid (meant to agree with the grid; a window's mean is then over its
    counted tokens, 0 when it has none). Padding may hold anything, NaN included.
    Grids may differ per row and may be traced (jit); a concrete grid is checked with
    `check_pool_grid`. Memory: one f32 [K, N] weight matrix per row.
    """
    if visual.ndim != 3:
        raise ValueError(f"visual must be [B, N, D], got shape {visual.shape}")
    b, n, _ = visual.shape
    if tuple(grid.shape) != (b, 2):
        raise ValueError(f"grid must be [{b}, 2], got shape {tuple(grid.shape)}")
    if visual_valid is not None and tuple(visual_valid.shape) != (b, n):
        raise ValueError(f"visual_valid must be [{b}, {n}], got shape {tuple(visual_valid.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    keep = int(keep)
    if not isinstance(grid, jax.core.Tracer):
        check_pool_grid(np.asarray(grid), keep, n=n)

    grid = jnp.asarray(grid, jnp.int32)
    rows, cols = grid[:, 0], grid[:, 1]  # [B]
    h, w = _output_shape(rows, cols, keep)
    k = jnp.arange(keep, dtype=jnp.int32)[None, :]  # [1, K]
    i, j = k // w[:, None], k % w[:, None]  # [B, K] output cell of each pooled token
    r, c, hh, ww = rows[:, None], cols[:, None], h[:, None], w[:, None]
    r0, r1 = (i * r) // hh, ((i + 1) * r + hh - 1) // hh  # floor / ceil, as adaptive_avg_pool2d
    c0, c1 = (j * c) // ww, ((j + 1) * c + ww - 1) // ww
    slots = ((r0 + r1 - 1) // 2) * c + (c0 + c1 - 1) // 2  # [B, K]

    s = jnp.arange(n, dtype=jnp.int32)[None, :]  # [1, N]
    real = s < r * c  # [B, N]
    if visual_valid is not None:
        real = real & (visual_valid != 0)
    sr, sc = (s // c)[:, None, :], (s % c)[:, None, :]  # [B, 1, N]
    inside = (
        real[:, None, :]
        & (sr >= r0[..., None])
        & (sr < r1[..., None])
        & (sc >= c0[..., None])
        & (sc < c1[..., None])
    )  # [B, K, N]
    count = jnp.sum(inside, axis=-1, keepdims=True, dtype=jnp.int32)
    weight = jnp.where(inside, 1.0 / jnp.maximum(count, 1).astype(jnp.float32), 0.0)
    x = jnp.where(
        real[..., None], visual.astype(jnp.float32), 0.0
    )  # NaN padding never reaches the dot
    tokens = jnp.einsum("bkn,bnd->bkd", weight, x, precision=HIGHEST)
    return tokens, slots.astype(jnp.int32)


def pool_flops(n: int, d: int, keep: int) -> int:
    """FLOPs of `pool_tokens` for one row: the [K, N] x [N, D] weight matmul as implemented
    (dense, padding and zero weights included), 2 per multiply-add: 2 * K * N * D. The
    integer window bookkeeping (O(K N)) is not counted."""
    return 2 * keep * n * d


def _select(inputs: MethodInputs, *, keep: int, batching: str) -> Selection:
    if inputs.grid is None:
        raise ValueError(
            "method 'pool' needs each row's visual tokens as a 2-D grid; this model's visual tokens are not one "
            "(e.g. a [CLS] token among them)"
        )
    tokens, slots = pool_tokens(inputs.visual, inputs.grid, keep=keep, visual_valid=inputs.valid)
    return Selection(slots, tokens)


METHOD = Method(
    name="pool",
    stage="embedding",
    select=_select,
    flops=lambda n, d, keep, text_tokens, **_: 0 if keep >= n else pool_flops(n, d, keep),
    summary="adaptive average pooling of each row's token grid to h' x w' = K (aspect kept), at window centres",
    citation="arXiv:2510.07143 (VTC-Bench); windows of torch.nn.functional.adaptive_avg_pool2d",
    needs_grid=True,
    merges=True,
    check_layout=check_pool_grid,
)
