"""The compared methods as functions of arrays: CDPruner, ZSPAPrune core_ratio="auto",
VisPruner and VisionZip against the eager PyTorch references, plus properties and errors.

Shapes are few on purpose (each (shape, keep) compiles once); variety comes from seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.pruning_data import assert_same, check_valid, make_data
from tests.support.torch_reference_pruning import (
    cdpruner_reference,
    select_auto_reference,
    visionzip_reference,
    vispruner_reference,
)
from zspa_jax import pruning
from zspa_jax.methods import visionzip as vz
from zspa_jax.methods import vispruner as vp
from zspa_jax.pruning import PruneConfig, auto_core_ratio, select_tokens

SHAPE = dict(b=4, n=40, t=6, d=16)
# Auto's outlier rule needs the bulk of cosines to be narrower than the room up to 1:
# at D = 16 random cosines spread by ~0.25 and nothing can stand out; real models have D >= 1024.
AUTO_SHAPE = dict(b=4, n=40, t=6, d=64)
K = 10


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def T(x):
    return None if x is None else torch.from_numpy(np.array(x))


def J(x):
    return None if x is None else jnp.asarray(x)


def jsel(v, p, m, **kw) -> np.ndarray:
    out = select_tokens(J(v), J(p), J(m), **kw)
    assert out.dtype == jnp.int32
    return np.asarray(out)


def spiked(seed: int, b: int, n: int, t: int, d: int, n_spikes: list[int]):
    """Gaussian tokens where row i has n_spikes[i] tokens pulled toward the prompt mean."""
    v, p, m = make_data(seed, b, n, t, d)
    m[:, 0] = True
    rng = np.random.default_rng(seed + 1000)
    for i, count in enumerate(n_spikes):
        pm = p[i][m[i]].mean(0)
        pm = pm / np.linalg.norm(pm)
        for j in rng.choice(n, count, replace=False):
            v[i, j] = (
                np.linalg.norm(v[i, j]) * (0.9 * pm + 0.1 * v[i, j] / np.linalg.norm(v[i, j]))
            ).astype(np.float32)
    return v, p, m


# --------------------------------------------------------------------------- CDPruner


@pytest.mark.parametrize("keep", [1, K])
def test_cdpruner_matches_reference(keep):
    for seed in range(16):
        kind = "clustered" if seed % 2 else "gauss"
        v, p, m = make_data(seed, **SHAPE, kind=kind)  # seed % 5 == 0: an all-masked prompt row
        got = jsel(v, p, m, keep=keep, method="cdpruner")
        check_valid(got, SHAPE["b"], SHAPE["n"], keep)
        assert_same(
            got, cdpruner_reference(T(v), T(p), T(m), keep=keep).numpy(), f"seed {seed} {kind}"
        )


def test_cdpruner_special_shapes_and_theta():
    from zspa_jax.methods.cdpruner import cdpruner_select

    for seed in range(4):
        # K = N - 1 with D > N (the kernel keeps full rank), and K = N.
        v, p, m = make_data(50 + seed, 2, 12, 3, 24, kind="clustered" if seed % 2 else "gauss")
        assert_same(
            jsel(v, p, m, keep=11, method="cdpruner"),
            cdpruner_reference(T(v), T(p), T(m), keep=11).numpy(),
            "N-1",
        )
        assert (jsel(v, p, m, keep=12, method="cdpruner") == np.arange(12)).all()
        # The paper's theta weighting exp(alpha * w).
        got = np.asarray(cdpruner_select(J(v), J(p), J(m), keep=5, theta=0.5))
        assert_same(got, cdpruner_reference(T(v), T(p), T(m), keep=5, theta=0.5).numpy(), "theta")


def test_cdpruner_exact_ties_go_to_lower_index():
    # Axis-aligned tokens with duplicates and no real prompt token (equal weights): every
    # gain is exactly 0 or 1, so the greedy MAP takes one token per axis, lowest index first.
    axes = np.array([2, 0, 2, 1, 0, 3, 1, 3, 2])
    v = (np.eye(4)[axes] * np.arange(1, 10)[:, None]).astype(np.float32)[None]
    p, m = np.ones((1, 2, 4), np.float32), np.zeros((1, 2), bool)
    got = jsel(v, p, m, keep=4, method="cdpruner")
    first_per_axis = sorted(int(np.flatnonzero(axes == a)[0]) for a in range(4))
    assert got[0].tolist() == first_per_axis
    assert_same(got, cdpruner_reference(T(v), T(p), T(m), keep=4).numpy(), "ties")


def test_cdpruner_batch_equals_per_example_and_inside_jit():
    v, p, m = make_data(7, **SHAPE, kind="clustered")
    batched = jsel(v, p, m, keep=K, method="cdpruner")
    for b in range(SHAPE["b"]):
        assert np.array_equal(
            jsel(v[b : b + 1], p[b : b + 1], m[b : b + 1], keep=K, method="cdpruner")[0], batched[b]
        )
    from zspa_jax.methods.cdpruner import cdpruner_select

    mapped = np.asarray(cdpruner_select(J(v), J(p), J(m), keep=K, batching="map"))
    assert np.array_equal(mapped, batched)
    inner = jax.jit(lambda v, p, m: select_tokens(v, p, m, keep=K, method="cdpruner"))
    assert np.array_equal(np.asarray(inner(J(v), J(p), J(m))), batched)


# --------------------------------------------------------------------------- core_ratio="auto"


@pytest.mark.slow
def test_auto_matches_reference():
    seen = set()
    for seed in range(10):
        spikes = [int(x) for x in np.random.default_rng(seed).integers(0, 12, AUTO_SHAPE["b"])]
        v, p, m = spiked(seed, **AUTO_SHAPE, n_spikes=spikes)
        ref, ref_r = select_auto_reference(T(v), T(p), T(m), keep=K)
        got = jsel(v, p, m, keep=K, core_ratio="auto")
        assert_same(got, ref.numpy(), f"seed {seed}")
        r = np.asarray(auto_core_ratio(J(v), J(p), J(m), keep=K))
        assert r.dtype == np.float32 and np.allclose(r, ref_r, atol=1e-7), (r, ref_r)
        # Same indices as a fixed core ratio equal to the chosen one.
        for b in range(AUTO_SHAPE["b"]):
            fixed = jsel(
                v[b : b + 1], p[b : b + 1], m[b : b + 1], keep=K, core_ratio=float(ref_r[b])
            )
            assert np.array_equal(fixed[0], got[b]), (seed, b)
        seen |= {round(x * K) for x in ref_r}
    assert 0 in seen and K in seen and seen & set(range(1, K)), seen  # r = 0, r = 1 and in between


def test_auto_special_cases():
    # All-masked prompt: every score 0, no outlier -> r = 0 (DivPrune).
    v, p, _ = make_data(3, **AUTO_SHAPE, kind="clustered")
    m = np.zeros(p.shape[:2], bool)
    assert (np.asarray(auto_core_ratio(J(v), J(p), J(m), keep=K)) == 0).all()
    assert np.array_equal(
        jsel(v, p, m, keep=K, core_ratio="auto"), jsel(v, p, m, keep=K, method="divprune")
    )
    # K = 1 and K = N.
    v, p, m = spiked(4, **AUTO_SHAPE, n_spikes=[0, 1, 3, 20])
    for keep in (1, AUTO_SHAPE["n"]):
        ref, _ = select_auto_reference(T(v), T(p), T(m), keep=keep)
        assert_same(jsel(v, p, m, keep=keep, core_ratio="auto"), ref.numpy(), f"keep {keep}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    spikes=st.lists(st.integers(0, 20), min_size=4, max_size=4),
    exponents=st.lists(st.integers(-8, 8), min_size=40, max_size=40),
    scale_exponent=st.integers(-10, 10),
)
def test_auto_properties(seed, spikes, exponents, scale_exponent):
    v, p, m = spiked(seed, **AUTO_SHAPE, n_spikes=spikes)
    r = np.asarray(auto_core_ratio(J(v), J(p), J(m), keep=K))
    idx = jsel(v, p, m, keep=K, core_ratio="auto")
    # Deterministic; r in [0, 1] and a whole number of core tokens.
    assert np.array_equal(r, np.asarray(auto_core_ratio(J(v), J(p), J(m), keep=K)))
    assert np.array_equal(idx, jsel(v, p, m, keep=K, core_ratio="auto"))
    assert ((0 <= r) & (r <= 1)).all() and np.allclose(r * K, np.round(r * K), atol=1e-5)
    # Positive per-token powers of two and a global positive factor on tokens and prompt.
    pow2 = (2.0 ** np.array(exponents, np.float64))[None, :, None].astype(np.float32)
    # Only power-of-two factors are exact in float32: another factor rounds each product, which
    # can flip a near-tie of two relevance scores (README, core_ratio="auto").
    scale = np.float32(2.0**scale_exponent)
    for v2, p2 in ((v * pow2, p), (v * scale, p * scale)):
        assert np.array_equal(np.asarray(auto_core_ratio(J(v2), J(p2), J(m), keep=K)), r)
        assert np.array_equal(jsel(v2, p2, m, keep=K, core_ratio="auto"), idx)


def test_auto_non_power_of_two_scale_can_flip_a_near_tie():
    """The counterexample that keeps the property above to powers of two: scaling by 1e-3
    rounds the relevance scores of row 1 differently, and a near-tie changes one pick."""
    v, p, m = spiked(5562, **AUTO_SHAPE, n_spikes=[6, 12, 0, 0])
    idx = jsel(v, p, m, keep=K, core_ratio="auto")
    scaled = jsel(v * np.float32(1e-3), p * np.float32(1e-3), m, keep=K, core_ratio="auto")
    assert np.array_equal(idx[[0, 2, 3]], scaled[[0, 2, 3]])
    assert not np.array_equal(idx[1], scaled[1])
    ref, _ = select_auto_reference(T(v), T(p), T(m), keep=K)
    assert_same(idx, ref.numpy(), "reference")  # the unscaled inputs hold no such near-tie


@pytest.mark.parametrize("method", ["cdpruner", "relevance", "divprune", "vispruner", "uniform"])
def test_auto_needs_a_method_with_a_core(method):
    v, p, m = make_data(1, **AUTO_SHAPE)
    with pytest.raises(ValueError, match=f"'auto'.*{method}.*no core"):
        select_tokens(J(v), J(p), J(m), keep=K, method=method, core_ratio="auto")
    with pytest.raises(ValueError, match=f"'auto'.*{method}.*no core"):
        PruneConfig(keep=K, method=method, core_ratio="auto")
    with pytest.raises(ValueError, match="core_ratio.*'auto'"):
        PruneConfig(keep=K, core_ratio="sometimes")
    assert PruneConfig(keep=K, core_ratio="auto").options["core_ratio"] == "auto"


# --------------------------------------------------------------------------- VisPruner


def attention_like(seed: int, b: int, n: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.full(n, 0.5), size=b).astype(np.float32)
    if ties:  # quantised: many exact ties, resolved by index
        a = (np.round(a * 20) / 20).astype(np.float32)
    return a


@pytest.mark.parametrize("n,keep", [(40, 10), (37, 9), (40, 1), (40, 40), (37, 36)])
def test_vispruner_matches_reference(n, keep):
    for seed in range(6):
        kind = "clustered" if seed % 2 else "gauss"
        x, _, _ = make_data(seed, 3, n, 1, 16, kind=kind)
        a = attention_like(seed, 3, n, ties=seed % 3 == 0)
        got = jsel(x, None, None, keep=keep, method="vispruner", cls_attention=a)
        check_valid(got, 3, n, keep)
        assert_same(got, vispruner_reference(T(x), T(a), keep=keep).numpy(), f"seed {seed} {kind}")


def test_vispruner_batch_equals_per_example_and_schedule():
    x, _, _ = make_data(9, 3, 40, 1, 16, kind="clustered")
    a = attention_like(9, 3, 40)
    batched = jsel(x, None, None, keep=K, method="vispruner", cls_attention=a)
    for b in range(3):
        one = jsel(x[b : b + 1], None, None, keep=K, method="vispruner", cls_attention=a[b : b + 1])
        assert np.array_equal(one[0], batched[b])
    # The important half is the top of the attention ranking.
    t_imp, _ = vp.split_counts(K)
    for b in range(3):
        top = np.argsort(-a[b], kind="stable")[:t_imp]
        assert set(top) <= set(batched[b])
    # Official LLaVA-1.5 setting: N = 576, K = 64 -> 64 rounds of 8 then done.
    assert vp.schedule(576, 64)[0] == (544, 8) and len(vp.schedule(576, 64)) == 64


# --------------------------------------------------------------------------- VisionZip


def test_visionzip_split_counts_follow_the_official_configurations():
    assert [vz.split_counts(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert vz.split_counts(1) == (1, 0)


@pytest.mark.parametrize("keep,full", [(10, False), (1, False), (16, False), (17, True), (6, True)])
def test_visionzip_matches_reference(keep, full):
    length = 17  # [CLS] + 16 patches; placeholders N = 16 ("default") or 17 ("full")
    for seed in range(5):
        h, _, _ = make_data(seed, 3, length, 1, 12, kind="clustered" if seed % 2 else "gauss")
        keys, _, _ = make_data(seed + 50, 3, length, 1, 8, kind="clustered")
        a = attention_like(seed, 3, length, ties=seed % 2 == 0)
        tokens, slots = vz.visionzip_merge(J(h), J(a), J(keys), keep=keep, cls_in_placeholders=full)
        ref_tokens, ref_slots = visionzip_reference(
            T(h), T(a), T(keys), keep=keep, cls_in_placeholders=full
        )
        assert tokens.shape == (3, keep, 12) and slots.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(slots), ref_slots.numpy())
        np.testing.assert_allclose(np.asarray(tokens), ref_tokens.numpy(), rtol=0, atol=1e-5)
        assert (np.asarray(slots) < length - (not full)).all()
        # Batch == per example.
        one_t, one_s = vz.visionzip_merge(
            J(h[1:2]), J(a[1:2]), J(keys[1:2]), keep=keep, cls_in_placeholders=full
        )
        np.testing.assert_array_equal(np.asarray(one_s)[0], np.asarray(slots)[1])
        np.testing.assert_array_equal(np.asarray(one_t)[0], np.asarray(tokens)[1])


# --------------------------------------------------------------------------- errors


def test_method_errors_name_the_method_and_the_reason():
    v, p, m = make_data(1, **SHAPE)
    with pytest.raises(ValueError, match="'vispruner'.*cls_attention.*without a \\[CLS\\]"):
        select_tokens(J(v), J(p), J(m), keep=K, method="vispruner")
    with pytest.raises(ValueError, match="cls_attention must have shape"):
        select_tokens(J(v), keep=K, method="vispruner", cls_attention=jnp.ones((4, 39)))
    for method in ("visionzip", "fastv"):
        with pytest.raises(ValueError, match=f"{method}.*PruneConfig"):
            select_tokens(J(v), J(p), J(m), keep=K, method=method)
    with pytest.raises(ValueError, match="prompt.*required.*cdpruner"):
        select_tokens(J(v), keep=K, method="cdpruner")
    for method in ("cdpruner", "vispruner"):
        with pytest.raises(ValueError, match="keep must be in \\[1, N=40\\]"):
            select_tokens(J(v), J(p), J(m), keep=41, method=method, cls_attention=jnp.ones((4, 40)))
    assert set(pruning.PRUNE_METHODS) >= {"cdpruner", "vispruner", "visionzip", "fastv"}
