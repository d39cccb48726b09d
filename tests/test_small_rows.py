"""Small rows (N <= 64 visual tokens) for every method whose select is a function of arrays.

Hypothesis draws the batch (B = 1..3), the row width N = 1..64, the budget K = 1..N, the
core ratio (exactly 0 and 1, ratios whose core rounds to 0, "auto") and per-row visual
masks (rows with fewer real tokens, their padding NaN) and prompt masks (rows with none).
ZSPAPrune (relevance, DivPrune), uniform, CDPruner and VisPruner are compared with their
eager torch references, run on each row's real tokens alone and mapped back to positions;
random, which has none, is checked by its defining properties; pool (a merging method, so
not reachable through select_tokens) against its adaptive_avg_pool2d reference. VisionZip,
FastV and DART read the vision tower or the LLM and are not functions of these arrays.

Every example compiles its own (B, N, K) once, so the examples are few. Two data kinds:
Gaussian tokens, and signed axis tokens whose cosines are exactly 0 or +-1 (exact ties
everywhere, resolved by the lower index in both frameworks); the ZSPAPrune test runs each
compiled shape on both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.support.torch_reference_pool import pool_reference
from tests.support.torch_reference_pruning import (
    cdpruner_reference,
    select_auto_reference,
    select_tokens_reference,
    vispruner_reference,
)
from zspa_jax.methods.pool import factor_pairs, pool_tokens
from zspa_jax.pruning import select_tokens

N_MAX = 64
D = 64  # >= N_MAX: CDPruner's kernel keeps full rank, so its gains never sink into rounding
T = 4
KINDS = ("gauss", "axes")


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    # The references run on tiny tensors; torch's worker threads would only contend.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclasses.dataclass(frozen=True)
class Rows:
    """One drawn layout: B rows of width N, budget K, and the real-token count of each row
    (None: no visual_mask at all; a count equal to N still passes a mask)."""

    b: int
    n: int
    keep: int
    real: tuple[int, ...] | None
    seed: int


@st.composite
def rows(draw, masks: bool = True) -> Rows:
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, N_MAX))
    keep = draw(st.integers(1, n))
    real = None
    if masks and draw(st.booleans()):
        real = tuple(draw(st.integers(keep, n)) for _ in range(b))
    return Rows(b, n, keep, real, draw(st.integers(0, 2**32 - 1)))


@dataclasses.dataclass
class Batch:
    visual: np.ndarray  # f32 [B, N, D], masked slots NaN
    prompt: np.ndarray  # f32 [B, T, D]
    prompt_mask: np.ndarray  # bool [B, T]
    valid: np.ndarray  # bool [B, N]: real tokens (all True without a mask)
    attention: np.ndarray  # f32 [B, N]: a [CLS] attention row per example
    masked: bool  # whether select_tokens gets visual_mask


def make_batch(layout: Rows, kind: str) -> Batch:
    """Tokens of `kind`: "gauss" (varied norms) or "axes" (power-of-two multiples of +-e_a
    over a few axes a, so every cosine and relevance is computed exactly)."""
    rng = np.random.default_rng(layout.seed + KINDS.index(kind))
    b, n = layout.b, layout.n
    if kind == "gauss":
        v = rng.standard_normal((b, n, D)) * rng.uniform(0.2, 5.0, (b, n, 1))
        attention = rng.dirichlet(np.full(n, 0.5), size=b)
    else:
        axes = rng.integers(0, int(rng.integers(1, 6)), (b, n))
        sign = rng.choice([-1.0, 1.0], (b, n))
        scale = 2.0 ** rng.integers(-2, 3, (b, n))
        v = np.eye(D)[axes] * (sign * scale)[..., None]
        attention = rng.integers(0, 4, (b, n)) / 4.0  # quantised: ties by index
    prompt = rng.standard_normal((b, T, D))
    prompt_mask = rng.random((b, T)) < 0.6
    prompt_mask[rng.random(b) < 0.25] = False  # some rows have no real prompt token: p = 0
    valid = np.ones((b, n), bool)
    if layout.real is not None:
        for i, count in enumerate(layout.real):
            valid[i] = False
            valid[i, rng.choice(n, count, replace=False)] = True
    visual = np.where(valid[..., None], v, np.nan)  # padding must never be read
    return Batch(
        visual.astype(np.float32),
        prompt.astype(np.float32),
        prompt_mask,
        valid,
        attention.astype(np.float32),
        layout.real is not None,
    )


def run(batch: Batch, **kwargs) -> np.ndarray:
    """select_tokens on the batch -> int32 [B, K] as numpy."""
    out = select_tokens(
        jnp.asarray(batch.visual),
        jnp.asarray(batch.prompt),
        jnp.asarray(batch.prompt_mask),
        visual_mask=jnp.asarray(batch.valid) if batch.masked else None,
        **kwargs,
    )
    assert out.dtype == jnp.int32
    return np.asarray(out)


def check_properties(got: np.ndarray, batch: Batch, keep: int) -> None:
    """Ascending, unique, in range, masked slots never kept; a row with exactly K real
    tokens keeps all of them (K = N without a mask: 0..N-1)."""
    b, n = batch.valid.shape
    assert got.shape == (b, keep)
    assert ((got >= 0) & (got < n)).all()
    assert (np.diff(got, axis=1) > 0).all()  # strictly ascending, so unique
    for i in range(b):
        assert batch.valid[i, got[i]].all(), f"row {i} keeps a masked slot: {got[i]}"
        real = np.flatnonzero(batch.valid[i])
        if len(real) == keep:
            assert got[i].tolist() == real.tolist()


def reference_rows(batch: Batch, select_row) -> np.ndarray:
    """The reference on each row's real tokens alone: select_row(i, positions) -> indices
    into positions; mapped back to slots, int [B, K]."""
    out = []
    for i in range(batch.valid.shape[0]):
        positions = np.flatnonzero(batch.valid[i])
        out.append(positions[np.asarray(select_row(i, positions))])
    return np.stack(out)


def row_tensors(batch: Batch, i: int, positions: np.ndarray):
    """Row i's real tokens, prompt and prompt mask as [1, ...] torch tensors."""
    return (
        torch.from_numpy(batch.visual[i : i + 1, positions]),
        torch.from_numpy(batch.prompt[i : i + 1]),
        torch.from_numpy(batch.prompt_mask[i : i + 1]),
    )


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    rows_differ = np.flatnonzero((got != want).any(axis=1))
    assert rows_differ.size == 0, (
        f"{what}: rows {rows_differ.tolist()} differ\njax   {got[rows_differ]}\ntorch {want[rows_differ]}"
    )


# --------------------------------------------------------------------------- ZSPAPrune and its ends

# Exactly 0 and 1, ratios whose core rounds to 0 at small K, and any r in between.
NUMERIC_RATIOS = st.one_of(
    st.sampled_from([0.0, 1.0, 0.25, 0.37, 0.5]), st.floats(0.0, 1.0, allow_nan=False)
)
# (method, core_ratio): relevance and DivPrune fix r (1 and 0) and have no core_ratio option.
METHOD_RATIOS = st.one_of(
    st.tuples(st.just("zspaprune"), st.one_of(NUMERIC_RATIOS, st.just("auto"))),
    st.tuples(st.sampled_from(["relevance", "divprune"]), st.none()),
)


@settings(deadline=None, max_examples=25)
@given(layout=rows(), method_ratio=METHOD_RATIOS)
# The core rounding to 0 with no fill pick to make (K = 1) on rows under 32 tokens: the
# prefix fill once got an empty prefix and failed at trace time.
@example(layout=Rows(1, 2, 1, None, 0), method_ratio=("zspaprune", 0.0))
@example(layout=Rows(2, 9, 1, None, 1), method_ratio=("zspaprune", 0.37))
@example(layout=Rows(3, 31, 1, (31, 5, 1), 2), method_ratio=("zspaprune", 0.25))
@example(layout=Rows(1, 4, 1, None, 3), method_ratio=("divprune", None))
def test_zspaprune_matches_reference(layout, method_ratio):
    method, core_ratio = method_ratio
    for kind in KINDS:
        batch = make_batch(layout, kind)
        options = {} if core_ratio is None else {"core_ratio": core_ratio}
        got = run(batch, keep=layout.keep, method=method, **options)
        check_properties(got, batch, layout.keep)

        def select_row(i, positions):
            v, p, m = row_tensors(batch, i, positions)
            if method == "zspaprune" and core_ratio == "auto":
                return select_auto_reference(v, p, m, keep=layout.keep)[0][0].numpy()
            want = select_tokens_reference(v, p, m, keep=layout.keep, method=method, **options)
            return want[0].numpy()

        assert_same(got, reference_rows(batch, select_row), f"{method} r={core_ratio} {kind}")


# --------------------------------------------------------------------------- CDPruner


@settings(deadline=None, max_examples=10)
@given(layout=rows())
def test_cdpruner_matches_reference(layout):
    # Gaussian tokens only: among axis tokens the greedy MAP's gains after the kernel's rank
    # are rounding noise (f32 here, f64 in the reference), so their order is not defined.
    batch = make_batch(layout, "gauss")
    got = run(batch, keep=layout.keep, method="cdpruner")
    check_properties(got, batch, layout.keep)

    def select_row(i, positions):
        return cdpruner_reference(*row_tensors(batch, i, positions), keep=layout.keep)[0].numpy()

    assert_same(got, reference_rows(batch, select_row), "cdpruner")


# --------------------------------------------------------------------------- uniform and random


@settings(deadline=None, max_examples=10)
@given(layout=rows())
def test_uniform_matches_reference(layout):
    batch = make_batch(layout, "gauss")  # uniform reads no values
    got = run(batch, keep=layout.keep, method="uniform")
    check_properties(got, batch, layout.keep)

    def select_row(i, positions):
        v, p, m = row_tensors(batch, i, positions)
        return select_tokens_reference(v, p, m, keep=layout.keep, method="uniform")[0].numpy()

    assert_same(got, reference_rows(batch, select_row), "uniform")


@settings(deadline=None, max_examples=10)
@given(layout=rows(), key=st.integers(0, 2**31 - 1))
def test_random_keeps_a_valid_subset(layout, key):
    batch = make_batch(layout, "gauss")
    got = run(batch, keep=layout.keep, method="random", rng=jax.random.key(key))
    check_properties(got, batch, layout.keep)
    assert np.array_equal(
        run(batch, keep=layout.keep, method="random", rng=jax.random.key(key)), got
    )
    # Rows are independent: new tokens and real slots in the other rows (same shapes, so
    # no new compile) leave each row's subset as it was.
    other = make_batch(layout, "axes")
    for i in range(layout.b):
        mixed = dataclasses.replace(
            other,
            visual=np.where(np.arange(layout.b)[:, None, None] == i, batch.visual, other.visual),
            valid=np.where(np.arange(layout.b)[:, None] == i, batch.valid, other.valid),
        )
        again = run(mixed, keep=layout.keep, method="random", rng=jax.random.key(key))
        assert again[i].tolist() == got[i].tolist(), f"row {i} moved with the other rows"


# --------------------------------------------------------------------------- VisPruner


@settings(deadline=None, max_examples=10)
@given(layout=rows(masks=False), kind=st.sampled_from(KINDS))
def test_vispruner_matches_reference(layout, kind):
    batch = make_batch(layout, kind)  # VisPruner takes no visual_mask
    got = run(
        batch, keep=layout.keep, method="vispruner", cls_attention=jnp.asarray(batch.attention)
    )
    check_properties(got, batch, layout.keep)
    want = vispruner_reference(
        torch.from_numpy(batch.visual), torch.from_numpy(batch.attention), keep=layout.keep
    ).numpy()
    assert_same(got, want, f"vispruner {kind}")


# --------------------------------------------------------------------------- pool

pool_jit = jax.jit(pool_tokens, static_argnames="keep")


@st.composite
def pool_layouts(draw) -> tuple[np.ndarray, int, int]:
    """(grid int [B, 2] with rows * cols <= N_MAX, K with a factor pair inside every grid, seed)."""
    b = draw(st.integers(1, 3))
    grid = []
    for _ in range(b):
        r = draw(st.integers(1, 8))
        grid.append((r, draw(st.integers(1, N_MAX // r))))
    fitting = [
        k
        for k in range(1, min(r * c for r, c in grid) + 1)
        if all(any(h <= r and w <= c for h, w in factor_pairs(k)) for r, c in grid)
    ]
    return np.array(grid), draw(st.sampled_from(fitting)), draw(st.integers(0, 2**32 - 1))


@settings(deadline=None, max_examples=6)
@given(layout=pool_layouts())
@example(layout=(np.array([[1, 1]]), 1, 0))
@example(layout=(np.array([[1, 5], [5, 1], [2, 2]]), 1, 1))
def test_pool_matches_reference_on_small_grids(layout):
    grid, keep, seed = layout
    visual = np.random.default_rng(seed).standard_normal((len(grid), N_MAX, 8)).astype(np.float32)
    for i, (r, c) in enumerate(grid):
        visual[i, r * c :] = np.nan  # slots past the grid are padding
    tokens, slots = pool_jit(jnp.asarray(visual), jnp.asarray(grid, jnp.int32), keep=keep)
    want_tokens, want_slots = pool_reference(torch.from_numpy(visual), grid, keep)
    slots = np.asarray(slots)
    assert_same(slots, want_slots.numpy(), f"pool slots, grid {grid.tolist()} K={keep}")
    assert (np.diff(slots, axis=1) > 0).all()
    assert (slots < (grid[:, :1] * grid[:, 1:])).all()  # centre slots lie inside the grid
    np.testing.assert_allclose(np.asarray(tokens), want_tokens.numpy(), atol=1e-6, rtol=0)
