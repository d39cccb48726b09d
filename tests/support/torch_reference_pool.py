"""Plain eager PyTorch reference for the `pool` baseline (zspa_jax.methods.pool).

One row at a time: choose the output grid with plain Python (every factor pair of K,
costs compared exactly as fractions, no bracketing trick), pool with
`torch.nn.functional.adaptive_avg_pool2d`, and read the window bounds back in plain
loops for the centre slots.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F


def choose_shape_reference(rows: int, cols: int, keep: int) -> tuple[int, int]:
    """(h', w'), h' * w' = keep, h' <= rows, w' <= cols, minimising |log(h'/w') - log(rows/cols)|;
    ties -> smaller h'. |log x| is compared as max(x, 1/x), exactly."""
    best = None
    for h in range(1, keep + 1):
        if keep % h:
            continue
        w = keep // h
        if h > rows or w > cols:
            continue
        x = Fraction(h * cols, w * rows)  # (h/w) / (rows/cols)
        cost = max(x, 1 / x)
        if best is None or cost < best[0]:  # ascending h: a tie keeps the smaller h
            best = (cost, h, w)
    if best is None:
        raise ValueError(f"no factor pair of {keep} fits a {rows} x {cols} grid")
    return best[1], best[2]


def pool_one_reference(
    v: torch.Tensor, rows: int, cols: int, keep: int
) -> tuple[torch.Tensor, list[int]]:
    """v [N, D] (row-major grid tokens first) -> tokens f32 [keep, D], centre slots (list)."""
    h, w = choose_shape_reference(rows, cols, keep)
    d = v.shape[1]
    x = v[: rows * cols].float().reshape(rows, cols, d).permute(2, 0, 1)  # [D, rows, cols]
    pooled = F.adaptive_avg_pool2d(x, (h, w))  # [D, h, w]
    tokens = pooled.permute(1, 2, 0).reshape(keep, d)
    slots = []
    for i in range(h):
        r0, r1 = math.floor(i * rows / h), math.ceil((i + 1) * rows / h)
        for j in range(w):
            c0, c1 = math.floor(j * cols / w), math.ceil((j + 1) * cols / w)
            slots.append(((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2)
    return tokens, slots


def pool_reference(visual: torch.Tensor, grid, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """visual [B, N, D], grid [B, 2] (rows, cols) -> (tokens f32 [B, keep, D], slots int64 [B, keep])."""
    toks, slots = [], []
    for b in range(visual.shape[0]):
        rows, cols = (int(g) for g in grid[b])
        t, s = pool_one_reference(visual[b], rows, cols, keep)
        toks.append(t)
        slots.append(torch.tensor(s, dtype=torch.int64))
    return torch.stack(toks), torch.stack(slots)
