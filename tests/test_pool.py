"""The `pool` baseline (zspa_jax.methods.pool) against an eager torch reference
(tests/support/torch_reference_pool.py: torch.nn.functional.adaptive_avg_pool2d)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from tests.support.torch_reference_pool import choose_shape_reference, pool_reference
from zspa_jax.methods.pool import check_pool_grid, factor_pairs, pool_flops, pool_tokens

ATOL = 1e-6

pool_jit = jax.jit(pool_tokens, static_argnames="keep")


def _visual(b: int, n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, n, d)).astype(np.float32)


def _check_against_reference(visual: np.ndarray, grid: np.ndarray, keep: int):
    tokens, slots = pool_jit(jnp.asarray(visual), jnp.asarray(grid, jnp.int32), keep=keep)
    ref_tokens, ref_slots = pool_reference(torch.from_numpy(visual), grid, keep)
    assert tokens.dtype == jnp.float32 and tokens.shape == (visual.shape[0], keep, visual.shape[2])
    assert slots.dtype == jnp.int32 and slots.shape == (visual.shape[0], keep)
    np.testing.assert_array_equal(np.asarray(slots), ref_slots.numpy())
    err = np.max(np.abs(np.asarray(tokens) - ref_tokens.numpy()))
    assert err <= ATOL, err
    assert np.all(np.diff(np.asarray(slots), axis=1) > 0)  # distinct, ascending
    return np.asarray(tokens), np.asarray(slots)


@pytest.mark.parametrize("keep", [1, 16, 64, 144, 576])
def test_llava_square_grid_matches_torch(keep):
    visual = _visual(2, 576, 32, seed=keep)
    grid = np.array([[24, 24], [24, 24]])
    tokens, slots = _check_against_reference(visual, grid, keep)
    if keep == 576:  # one-token windows: the tokens themselves, in place
        np.testing.assert_array_equal(tokens, visual)
        np.testing.assert_array_equal(slots, np.tile(np.arange(576), (2, 1)))
    if keep == 1:  # one window, the whole grid; centre (11, 11)
        np.testing.assert_allclose(tokens[:, 0], visual.mean(axis=1), atol=ATOL)
        np.testing.assert_array_equal(slots, [[11 * 24 + 11]] * 2)


def test_k64_on_24x24_is_8x8_of_3x3_windows():
    assert choose_shape_reference(24, 24, 64) == (8, 8)
    visual = _visual(2, 576, 32, seed=3)  # the shapes of the test above: no new compile
    tokens, slots = _check_against_reference(visual, np.array([[24, 24], [24, 24]]), 64)
    blocks = (
        visual.reshape(2, 8, 3, 8, 3, 32).mean(axis=(2, 4)).reshape(2, 64, 32)
    )  # [B, 8 rows, 3, 8 cols, 3, D]
    np.testing.assert_allclose(tokens, blocks, atol=ATOL, rtol=0)
    centre = 3 * np.arange(8) + 1
    np.testing.assert_array_equal(slots[0], (centre[:, None] * 24 + centre[None, :]).ravel())


NON_SQUARE = [(14, 22), (10, 6), (22, 14), (3, 50), (11, 28), (7, 7), (1, 40)]


@pytest.mark.parametrize(
    ("keep", "shapes"),
    [
        # (rows, cols) -> (h', w') for the grids where keep fits, from the reference's rule
        (
            9,
            {
                (14, 22): (3, 3),
                (10, 6): (3, 3),
                (22, 14): (3, 3),
                (3, 50): (1, 9),
                (11, 28): (3, 3),
                (7, 7): (3, 3),
                (1, 40): (1, 9),
            },
        ),
        (
            15,
            {
                (14, 22): (3, 5),
                (10, 6): (5, 3),
                (22, 14): (5, 3),
                (3, 50): (1, 15),
                (11, 28): (3, 5),
                (7, 7): (3, 5),
                (1, 40): (1, 15),
            },
        ),  # 7 x 7: 3 x 5 / 5 x 3 tie
        (
            16,
            {
                (14, 22): (4, 4),
                (10, 6): (4, 4),
                (22, 14): (4, 4),
                (3, 50): (1, 16),
                (11, 28): (2, 8),
                (7, 7): (4, 4),
                (1, 40): (1, 16),
            },
        ),
        (77, {(14, 22): (7, 11), (22, 14): (11, 7), (11, 28): (7, 11), (1, 40): None}),
    ],
)
@pytest.mark.slow
def test_non_square_grids_match_torch(keep, shapes):
    """A batch of different non-square grids per K (windows overlap where h' does not divide rows)."""
    grids = [g for g in NON_SQUARE if any(h <= g[0] and w <= g[1] for h, w in factor_pairs(keep))]
    assert {g: choose_shape_reference(*g, keep) for g in grids} == {
        g: s for g, s in shapes.items() if s is not None
    }
    grid = np.array(grids)
    n = 320  # >= every rows * cols: trailing padding slots, NaN
    visual = _visual(len(grids), n, 16, seed=keep)
    for b, (rows, cols) in enumerate(grids):
        visual[b, rows * cols :] = np.nan
    _check_against_reference(visual, grid, keep)


ASPECT_CASES = [
    ((10, 20), (2, 6)),  # 2/6 and 3/4 are both a factor 3/2 from 1/2: tie -> smaller h'
    ((24, 24), (3, 4)),  # 3/4 and 4/3 tie around 1 -> smaller h'
    ((14, 22), (3, 4)),
    ((10, 6), (4, 3)),
    ((2, 30), (1, 12)),  # 1/12 is a factor 1.25 from 1/15, 2/6 a factor 5
    ((3, 40), (1, 12)),  # 3 x 4 would fit but 1/12 is closer to 3/40
    ((12, 1), (12, 1)),
]


def test_aspect_choice_k12():
    for (rows, cols), expected in ASPECT_CASES:
        assert choose_shape_reference(rows, cols, 12) == expected, (rows, cols)
    assert choose_shape_reference(24, 24, 64) == (8, 8)
    assert choose_shape_reference(4, 4, 8) == (2, 4)  # 2 x 4 and 4 x 2 tie
    # The kernel's (traced, integer) choice shows in its slots and tokens.
    grid = np.array([g for g, _ in ASPECT_CASES])
    visual = _visual(len(grid), 576, 4, seed=1)
    _check_against_reference(visual, grid, 12)


@pytest.mark.parametrize("keep", [8, 12, 36])
@pytest.mark.slow
def test_choice_matches_reference_on_all_small_grids(keep):
    """The kernel's bracketing rule equals the brute-force exact rule on every grid up to 12 x 12."""
    grids = [
        (r, c)
        for r in range(1, 13)
        for c in range(1, 13)
        if any(h <= r and w <= c for h, w in factor_pairs(keep))
    ]
    g = np.array(grids)
    visual = _visual(len(grids), 144, 2, seed=keep)
    _, slots = pool_jit(jnp.asarray(visual), jnp.asarray(g, jnp.int32), keep=keep)
    _, ref_slots = pool_reference(torch.from_numpy(visual), g, keep)
    np.testing.assert_array_equal(np.asarray(slots), ref_slots.numpy())


@pytest.mark.slow
def test_batch_of_different_grids_with_nan_padding():
    grid = np.array([[24, 24], [14, 22], [10, 6], [5, 7]])
    n, d, keep = 576, 24, 12
    visual = _visual(len(grid), n, d, seed=7)
    for b, (rows, cols) in enumerate(grid):
        visual[b, rows * cols :] = np.nan
    tokens, slots = _check_against_reference(visual, grid, keep)
    assert np.all(np.isfinite(tokens))
    for b in range(len(grid)):  # each row alone (one compile: the grid is traced)
        alone_t, alone_s = pool_jit(
            jnp.asarray(visual[b : b + 1]), jnp.asarray(grid[b : b + 1]), keep=keep
        )
        np.testing.assert_array_equal(np.asarray(alone_s)[0], slots[b])
        np.testing.assert_allclose(np.asarray(alone_t)[0], tokens[b], atol=ATOL, rtol=0)
    # ... and alone without any padding (N = rows * cols).
    unpadded_t, unpadded_s = pool_jit(
        jnp.asarray(visual[2:3, :60]), jnp.asarray(grid[2:3]), keep=keep
    )
    np.testing.assert_array_equal(np.asarray(unpadded_s)[0], slots[2])
    np.testing.assert_allclose(np.asarray(unpadded_t)[0], tokens[2], atol=ATOL, rtol=0)
    # A valid mask that agrees with the grid changes nothing.
    valid = np.arange(n)[None, :] < (grid[:, 0] * grid[:, 1])[:, None]
    masked_t, masked_s = pool_jit(
        jnp.asarray(visual), jnp.asarray(grid), keep=keep, visual_valid=jnp.asarray(valid)
    )
    np.testing.assert_array_equal(np.asarray(masked_s), slots)
    np.testing.assert_array_equal(np.asarray(masked_t), tokens)


def test_check_pool_grid_errors():
    check_pool_grid(np.array([[24, 24], [14, 22]]), 16)  # fits: no error
    with pytest.raises(ValueError, match=r"row 1 has grid 24 x 24 and keep=29.*1 x 29, 29 x 1"):
        check_pool_grid(np.array([[30, 30], [24, 24]]), 29)
    with pytest.raises(ValueError, match=r"row 0 has grid 5 x 7 and keep=36"):  # keep > rows * cols
        check_pool_grid(np.array([[5, 7]]), 36)
    with pytest.raises(ValueError, match=r"row 0 has grid 0 x 7"):
        check_pool_grid(np.array([[0, 7]]), 1)
    with pytest.raises(ValueError, match=r"row 1 has grid 10 x 10 = 100 tokens but only 64 slots"):
        check_pool_grid(np.array([[8, 8], [10, 10]]), 4, n=64)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        check_pool_grid(np.array([24, 24]), 4)
    # Eager calls with a concrete grid are checked too.
    with pytest.raises(ValueError, match=r"row 0 has grid 24 x 24 and keep=29"):
        pool_tokens(jnp.zeros((1, 576, 4)), jnp.array([[24, 24]]), keep=29)


def test_bf16_input_is_its_f32_upcast():
    grid = np.array([[24, 24], [14, 22]])
    visual = _visual(2, 576, 32, seed=11).astype(ml_dtypes.bfloat16)
    visual[1, 14 * 22 :] = np.nan
    got_t, got_s = pool_jit(jnp.asarray(visual), jnp.asarray(grid), keep=16)
    want_t, want_s = pool_jit(jnp.asarray(visual.astype(np.float32)), jnp.asarray(grid), keep=16)
    assert got_t.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got_s), np.asarray(want_s))
    np.testing.assert_array_equal(np.asarray(got_t), np.asarray(want_t))


def test_jit_keep_static_grid_traced():
    traces = []

    def counted(visual, grid, *, keep):
        traces.append(keep)
        return pool_tokens(visual, grid, keep=keep)

    f = jax.jit(counted, static_argnames="keep")
    visual = _visual(2, 308, 8, seed=5)
    for grid in ([[14, 22], [11, 28]], [[22, 14], [7, 44]]):  # new grid values: no retrace
        grid = np.array(grid)
        t, s = f(jnp.asarray(visual), jnp.asarray(grid, jnp.int32), keep=16)
        rt, rs = pool_reference(torch.from_numpy(visual), grid, 16)
        np.testing.assert_array_equal(np.asarray(s), rs.numpy())
        np.testing.assert_allclose(np.asarray(t), rt.numpy(), atol=ATOL, rtol=0)
    assert traces == [16]


def test_pool_flops():
    assert pool_flops(576, 4096, 64) == 2 * 64 * 576 * 4096
    assert pool_flops(1, 1, 1) == 2
