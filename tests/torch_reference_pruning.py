"""Plain eager PyTorch ZSPAPrune (the six steps of README.md, "ZSPAPrune, exactly"): the
oracle for zspa_jax.pruning.

Written the way a PyTorch user would: one example at a time, the full cosine-similarity
matrix, and a Python loop for the greedy fill that recomputes
c_j = max over selected i of sim[j, i] from scratch each step (no running-max trick),
so it checks the JAX kernel's incremental bookkeeping rather than mirroring it.
"""

from __future__ import annotations

import math

import torch


def select_tokens_reference(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    *,
    keep: int,
    method: str = "zspaprune",
    core_ratio: float = 0.6,
) -> torch.Tensor:
    """visual [B, N, D], prompt [B, T, D], prompt_mask [B, T] -> int64 [B, keep], ascending.

    method: "zspaprune" (uses core_ratio), "relevance" (r = 1), "divprune" (r = 0) or
    "uniform". ("random" has no reference: it is tested by its properties.)
    """
    if method == "relevance":
        core_ratio = 1.0
    elif method == "divprune":
        core_ratio = 0.0
    elif method not in ("zspaprune", "uniform"):
        raise ValueError(f"unknown method {method!r}")
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.bool)

    rows = []
    for b in range(visual.shape[0]):
        if method == "uniform":
            n = visual.shape[1]
            rows.append(torch.tensor([math.floor((i + 0.5) * n / keep) for i in range(keep)]))
        else:
            rows.append(select_one(visual[b], prompt[b], prompt_mask[b], keep, core_ratio))
    return torch.stack(rows)


def select_one(v: torch.Tensor, t: torch.Tensor, m: torch.Tensor, keep: int, r: float) -> torch.Tensor:
    """One example: v [N, D], t [T, D], m [T] -> int64 [keep], ascending."""
    v = v.float()
    t = t.float()
    m = m.bool()
    n = v.shape[0]
    if keep == n:
        return torch.arange(n)

    # Unit vectors (norm floored at 1e-6).
    v_unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)

    k = min(max(math.floor(keep * r + 0.5), 0), keep)
    if k > 0:
        # Mean of the real prompt tokens (0 if none), then cosine relevance of each token.
        p = t[m].sum(dim=0) / max(int(m.sum()), 1)
        p_unit = p / p.norm().clamp_min(1e-6)
        relevance = v_unit @ p_unit
        # Stable descending sort: among equal scores the lower index comes first.
        order = torch.sort(relevance, descending=True, stable=True).indices
        selected = order[:k].tolist()
        if k == keep:
            return torch.tensor(sorted(selected))

    sim = v_unit @ v_unit.T  # [N, N] cosine similarities
    if k == 0:
        # DivPrune's first pick: the token whose nearest other token is farthest.
        off_diag = sim.clone()
        off_diag.fill_diagonal_(-math.inf)
        selected = [int(torch.argmin(off_diag.max(dim=1).values))]

    while len(selected) < keep:
        closest = sim[:, selected].max(dim=1).values  # similarity to the nearest selected token
        closest[selected] = math.inf  # never re-pick
        selected.append(int(torch.argmin(closest)))  # argmin: first occurrence on ties
    return torch.tensor(sorted(selected))


def select_tokens_vectorised(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    *,
    keep: int,
    core_ratio: float = 0.6,
) -> torch.Tensor:
    """Batched torch version with a running max (same algorithm as the JAX kernel).

    For benchmarking only (second torch column); assumes 0 < k < keep < N.
    """
    visual = visual.float()
    prompt = prompt.float()
    bsz, n, _ = visual.shape
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.bool)
    m = prompt_mask.bool()
    k = min(max(math.floor(keep * core_ratio + 0.5), 0), keep)
    assert 0 < k < keep < n
    vn = visual / visual.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    p = torch.where(m[..., None], prompt, 0.0).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    pn = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    s = torch.einsum("bnd,bd->bn", vn, pn)
    core = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    ar = torch.arange(bsz)
    selected = torch.zeros(bsz, n, dtype=torch.bool)
    selected[ar[:, None], core] = True
    c = torch.einsum("bnd,bkd->bnk", vn, vn[ar[:, None], core]).amax(-1)
    picks = [core]
    for _ in range(keep - k):
        j = torch.where(selected, math.inf, c).argmin(1)
        selected[ar, j] = True
        c = torch.maximum(c, torch.einsum("bnd,bd->bn", vn, vn[ar, j]))
        picks.append(j[:, None])
    return torch.sort(torch.cat(picks, 1), dim=1).values
