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


def select_one(
    v: torch.Tensor, t: torch.Tensor, m: torch.Tensor, keep: int, r: float
) -> torch.Tensor:
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


# --------------------------------------------------------------------------- CDPruner


def cdpruner_reference(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    *,
    keep: int,
    theta: float | None = None,
) -> torch.Tensor:
    """CDPruner (arXiv:2506.10967): conditional-DPP greedy MAP -> int64 [B, keep], ascending.

    Written from the definition: the kernel L = diag(w) S diag(w) is built in full and each
    greedy step adds the token with the largest gain det(L_{Y+j}) / det(L_Y), computed as
    the Schur complement L_jj - L_jY L_YY^-1 L_Yj in float64 with a linear solve (no
    incremental Cholesky), so it checks the JAX kernel's bookkeeping rather than mirroring it.
    """
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.bool)
    rows = []
    for b in range(visual.shape[0]):
        v, t, m = visual[b].float(), prompt[b].float(), prompt_mask[b].bool()
        n = v.shape[0]
        if keep == n:
            rows.append(torch.arange(n))
            continue
        v_unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)
        p = t[m].sum(dim=0) / max(int(m.sum()), 1)
        relevance = v_unit @ (p / p.norm().clamp_min(1e-6))
        lo, hi = relevance.min(), relevance.max()
        # Official min-max normalisation; a constant relevance gives equal weights.
        w = (relevance - lo + 1e-6) / (hi - lo) if hi > lo else torch.ones(n)
        if theta is not None:
            w = torch.exp(theta / (2 * (1 - theta)) * w)
        sim = v_unit @ v_unit.T
        norm = v.norm(dim=1)
        # The diagonal is |v^_j|^2 exactly: 1 unless the norm was floored.
        sim.diagonal().copy_(torch.where(norm >= 1e-6, torch.ones(n), (norm / 1e-6) ** 2))
        kernel = (w[:, None] * sim * w[None, :]).double()
        selected: list[int] = []
        for _ in range(keep):
            gains = torch.diagonal(kernel).clone()
            if selected:
                sub = kernel[selected][:, selected]
                cross = kernel[selected]  # [|Y|, N]
                gains -= (cross * torch.linalg.solve(sub, cross)).sum(dim=0)
            gains[selected] = -math.inf
            selected.append(int(torch.argmax(gains)))  # first maximum: ties -> lower index
        rows.append(torch.tensor(sorted(selected)))
    return torch.stack(rows)


# --------------------------------------------------------------------------- ZSPAPrune, core_ratio="auto"


def auto_core_count_reference(relevance: torch.Tensor, keep: int) -> int:
    """Outliers above the bulk by the modified z-score (Iglewicz & Hoaglin): 0.6745 (s - med) / MAD > 3.5."""

    def median(
        x: torch.Tensor,
    ) -> torch.Tensor:  # midpoint of the two middle values (torch.median takes the lower)
        s = torch.sort(x).values
        return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2

    med = median(relevance)
    mad = median((relevance - med).abs())
    return min(int((0.6745 * (relevance - med) > 3.5 * mad).sum()), keep)


def select_auto_reference(
    visual: torch.Tensor,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    *,
    keep: int,
) -> tuple[torch.Tensor, list[float]]:
    """ZSPAPrune with the automatic core ratio: (indices int64 [B, keep], r per example)."""
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.bool)
    rows, ratios = [], []
    for b in range(visual.shape[0]):
        v, t, m = visual[b].float(), prompt[b].float(), prompt_mask[b].bool()
        v_unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)
        p = t[m].sum(dim=0) / max(int(m.sum()), 1)
        relevance = v_unit @ (p / p.norm().clamp_min(1e-6))
        k = auto_core_count_reference(relevance, keep)
        ratios.append(k / keep)
        rows.append(select_one(visual[b], prompt[b], prompt_mask[b], keep, k / keep))
    return torch.stack(rows), ratios


# --------------------------------------------------------------------------- VisPruner


def vispruner_reference(
    features: torch.Tensor, cls_attention: torch.Tensor, *, keep: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """VisPruner (arXiv:2412.01818) in the official code's shape, one example at a time.

    features [B, N, C] (tower features), cls_attention [B, N] ([CLS] row, head mean).
    Sorts are stable (ties -> lower index / earlier position); when a round asks for more
    drops than there are even-position tokens, all of them go (the slice semantics).
    """
    rows = []
    for b in range(features.shape[0]):
        x, a = features[b].float(), cls_attention[b].float()
        n_imp = int(keep * important_ratio)
        n_div = keep - n_imp
        order = torch.sort(a, descending=True, stable=True).indices
        important, residual = order[:n_imp], order[n_imp:]
        x_unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        while n_div > 0:
            r = min(8, len(residual) - n_div)
            if r <= 0:
                break
            a_idx, b_idx = residual[0::2], residual[1::2]
            scores = (x_unit[a_idx] @ x_unit[b_idx].T).max(dim=1).values  # most similar odd partner
            distinct = torch.sort(scores, descending=True, stable=True).indices[r:]
            residual = torch.cat([a_idx[distinct], b_idx])
        chosen = torch.cat([important, residual]) if n_div > 0 else important
        rows.append(torch.sort(chosen).values)
    return torch.stack(rows)


# --------------------------------------------------------------------------- VisionZip


def visionzip_reference(
    hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    *,
    keep: int,
    cls_in_placeholders: bool = False,
    contextual_share: float = 10 / 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip (arXiv:2412.04467) in the official code's shape -> (tokens [B, K, Dv], slots [B, K]).

    hidden [B, L, Dv] with [CLS] at 0; cls_attention [B, L] ([CLS] row, head mean); keys
    [B, L, Dh] (head mean). contextual = floor(K * contextual_share + 0.5) capped at K - 1
    (official: 10 of 64).
    """
    contextual = min(math.floor(keep * contextual_share + 0.5), keep - 1)
    dominant = keep - contextual
    out_tokens, out_slots = [], []
    slot = (lambda i: i) if cls_in_placeholders else (lambda i: max(i - 1, 0))
    for b in range(hidden.shape[0]):
        h, a, k = hidden[b].float(), cls_attention[b].float(), keys[b].float()
        length = h.shape[0]
        top = torch.sort(a[1:], descending=True, stable=True).indices[: dominant - 1] + 1
        dom = sorted([0] + top.tolist())
        rest = [i for i in range(length) if i not in set(dom)]
        tokens = [h[dom]]
        slots = [slot(i) for i in dom]
        if contextual:
            step = max(1, len(rest) // contextual)
            targets = list(range(0, len(rest), step))[:contextual]
            others = [p for p in range(len(rest)) if p not in targets]
            k_unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            tgt = [rest[p] for p in targets]
            ctx = h[tgt].clone()
            if others:
                oth = [rest[p] for p in others]
                nearest = torch.argmax(k_unit[oth] @ k_unit[tgt].T, dim=1)  # first maximum
                for c in range(contextual):
                    members = [oth[i] for i in range(len(oth)) if int(nearest[i]) == c]
                    if members:
                        ctx[c] = ctx[c] + h[members].mean(dim=0)
            tokens.append(ctx)
            slots += [slot(i) for i in tgt]
        out_tokens.append(torch.cat(tokens))
        out_slots.append(torch.tensor(slots))
    return torch.stack(out_tokens), torch.stack(out_slots)
