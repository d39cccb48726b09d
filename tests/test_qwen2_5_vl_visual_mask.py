"""select_tokens(..., visual_mask=[B, N]): rows with different numbers of real visual
tokens (Qwen2.5-VL images of different sizes) share one K; padding is never chosen and
never changes a choice: each row equals the eager torch reference on its real tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.support.torch_reference_pruning import cdpruner_reference, select_tokens_reference
from zspa_jax.pruning import select_tokens

CASES = [
    ("zspaprune", 0.6),
    ("relevance", 1.0),
    ("divprune", 0.0),
    ("zspaprune", 0.25),
    ("uniform", 0.6),
    ("cdpruner", 0.6),
]


@pytest.mark.parametrize("method,r", CASES)
def test_rows_equal_reference_on_real_tokens(method, r):
    rng = np.random.default_rng(3)
    b, n, d, t, keep = 4, 23, 16, 7, 6
    counts = [23, 9, 6, 15]
    visual = rng.standard_normal((b, n, d)).astype(np.float32)
    prompt = rng.standard_normal((b, t, d)).astype(np.float32)
    pmask = rng.random((b, t)) < 0.7
    valid = np.zeros((b, n), bool)
    for row, c in enumerate(counts):
        valid[row, :c] = True
    garbage = visual.copy()
    garbage[~valid] = np.nan  # padding may hold anything
    got = np.asarray(
        select_tokens(
            jnp.asarray(garbage),
            jnp.asarray(prompt),
            jnp.asarray(pmask),
            keep=keep,
            method=method,
            options={"core_ratio": r} if method == "zspaprune" else None,  # the others have none
            visual_mask=jnp.asarray(valid),
        )
    )
    for row, c in enumerate(counts):
        args = (
            torch.tensor(visual[row : row + 1, :c]),
            torch.tensor(prompt[row : row + 1]),
            torch.tensor(pmask[row : row + 1]),
        )
        if method == "cdpruner":
            ref = cdpruner_reference(*args, keep=keep).numpy()[0]
        else:
            ref = select_tokens_reference(*args, keep=keep, method=method, core_ratio=r).numpy()[0]
        np.testing.assert_array_equal(got[row], ref, err_msg=f"row {row} ({c} real tokens)")
        assert valid[row, got[row]].all()


def test_auto_core_rows_equal_reference_on_real_tokens():
    """core_ratio="auto" on ragged rows: the median/MAD and every pick read a row's real tokens only."""
    from tests.support.torch_reference_pruning import select_auto_reference

    rng = np.random.default_rng(5)
    b, n, d, t, keep = 4, 23, 16, 7, 6
    counts = [23, 9, 6, 15]
    visual = rng.standard_normal((b, n, d)).astype(np.float32)
    visual[:, :3] += 4.0 * rng.standard_normal((1, 1, d)).astype(
        np.float32
    )  # a few relevance outliers
    prompt = rng.standard_normal((b, t, d)).astype(np.float32)
    pmask = rng.random((b, t)) < 0.7
    valid = np.arange(n)[None, :] < np.asarray(counts)[:, None]
    garbage = np.where(valid[..., None], visual, np.nan).astype(np.float32)
    got = np.asarray(
        select_tokens(
            jnp.asarray(garbage),
            jnp.asarray(prompt),
            jnp.asarray(pmask),
            keep=keep,
            core_ratio="auto",
            visual_mask=jnp.asarray(valid),
        )
    )
    for row, c in enumerate(counts):
        ref, _ = select_auto_reference(
            torch.tensor(visual[row : row + 1, :c]),
            torch.tensor(prompt[row : row + 1]),
            torch.tensor(pmask[row : row + 1]),
            keep=keep,
        )
        np.testing.assert_array_equal(
            got[row], ref.numpy()[0], err_msg=f"row {row} ({c} real tokens)"
        )


def test_scattered_padding_maps_back_to_positions():
    rng = np.random.default_rng(4)
    n, d, keep = 12, 8, 4
    real = np.array([0, 2, 3, 7, 8, 11])
    visual = np.full((1, n, d), np.nan, np.float32)
    visual[0, real] = rng.standard_normal((len(real), d))
    prompt = rng.standard_normal((1, 5, d)).astype(np.float32)
    valid = np.zeros((1, n), bool)
    valid[0, real] = True
    got = np.asarray(
        select_tokens(
            jnp.asarray(visual), jnp.asarray(prompt), keep=keep, visual_mask=jnp.asarray(valid)
        )
    )
    ref = select_tokens_reference(
        torch.tensor(visual[:, real]), torch.tensor(prompt), keep=keep
    ).numpy()
    np.testing.assert_array_equal(got, real[ref])


def test_visual_mask_errors():
    v = jnp.zeros((2, 5, 4))
    p = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"visual_mask must have shape \[B, N\]"):
        select_tokens(v, p, keep=2, visual_mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="keep=3 exceeds the 2 real visual tokens of row 1"):
        select_tokens(
            v, p, keep=3, visual_mask=jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
        )
    for bad in ([[1, 1, 1, 1, 1], [1, 2, 1, 0, 0]], [[1, 1, 1, 1, 1], [1, np.nan, 1, 0, 0]]):
        with pytest.raises(ValueError, match="visual_mask row 1 holds values other than 0 and 1"):
            select_tokens(v, p, keep=2, visual_mask=jnp.asarray(bad, jnp.float32))
