"""zspa_jax.sampling.Sampling against a direct NumPy computation of the distribution it
should sample from, and the empirical frequencies of many seeded draws against it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zspa_jax.sampling import Sampling

# Two rows of fixed, distinct logits (no ties, so top-k is unambiguous).
LOGITS = np.array(
    [
        [1.3, -0.4, 2.1, 0.2, -1.7, 0.9, 1.8, -0.8, 0.5, -2.6, 1.1, 0.0],
        [-0.3, 0.7, -1.2, 2.4, 0.1, -0.6, 1.5, 0.35, -2.0, 0.95, -0.05, 1.9],
    ],
    np.float32,
)

CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(temperature=1.0, top_k=4),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=2.0, top_p=0.75),
    dict(temperature=0.5, top_p=0.9),
    dict(temperature=1.5, top_k=6, top_p=0.7),
    dict(temperature=0.8, top_k=5, top_p=0.5),
    dict(temperature=1.0, top_k=3, top_p=0.01),  # top-p below the largest probability: one token
]
CONFIG_IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS]


def reference_probabilities(
    logits: np.ndarray, temperature: float, top_k=None, top_p=None
) -> np.ndarray:
    """Float64, row by row: divide by the temperature; keep the top_k largest; keep the smallest
    prefix of those (sorted by probability) whose mass reaches top_p, at least one; renormalise."""
    out = np.zeros(logits.shape, np.float64)
    for b, row in enumerate(logits.astype(np.float64)):
        z = row / temperature
        order = np.argsort(-z, kind="stable")
        kept = order[: len(z) if top_k is None else top_k]
        p = np.exp(z[kept] - z[kept].max())
        p /= p.sum()
        if top_p is not None:
            cum = np.cumsum(p)
            # Configs are chosen so no cumulative mass sits within float32 noise of top_p.
            assert np.abs(cum - top_p).min() > 1e-4
            n = int(np.argmax(cum >= top_p)) + 1 if (cum >= top_p).any() else len(p)
            kept, p = kept[:n], p[:n] / p[:n].sum()
        out[b, kept] = p
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_probabilities_match_numpy(config):
    ours = np.asarray(Sampling(**config).probabilities(jnp.asarray(LOGITS)))
    ref = reference_probabilities(LOGITS, **config)
    assert ours.shape == LOGITS.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours > 0, ref > 0)  # exactly the same support
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.sum(-1), 1.0, rtol=1e-6)


def test_reference_configs_exercise_each_filter():
    """Guards the test data: temperature changes the distribution, and top-k and top-p each
    drop tokens the other settings keep (else a disabled filter could pass)."""
    full = reference_probabilities(LOGITS, 1.0)
    assert np.abs(reference_probabilities(LOGITS, 0.5) - full).max() > 0.1
    assert np.abs(reference_probabilities(LOGITS, 2.0) - full).max() > 0.1
    for config in CONFIGS:
        ref = reference_probabilities(LOGITS, **config)
        no_p = reference_probabilities(LOGITS, config["temperature"], config.get("top_k"))
        if "top_p" in config:
            assert ((ref == 0) & (no_p > 0)).any(), config  # top-p removes something within top-k
        if "top_k" in config:
            assert ((no_p == 0).sum(-1) == LOGITS.shape[1] - config["top_k"]).all()
    one = reference_probabilities(LOGITS, 1.0, 3, 0.01)
    assert ((one > 0).sum(-1) == 1).all()


def test_greedy_probabilities_are_one_hot_at_the_argmax():
    probs = np.asarray(Sampling().probabilities(jnp.asarray(LOGITS)))
    np.testing.assert_array_equal(probs, np.eye(LOGITS.shape[1])[LOGITS.argmax(-1)])
    tokens = np.asarray(Sampling()(jnp.asarray(LOGITS), jax.random.key(0)))
    np.testing.assert_array_equal(tokens, LOGITS.argmax(-1))


DRAWS = 40_000


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.slow
def test_sampled_frequencies_match_the_distribution(config):
    """DRAWS independent draws (one jitted vmap over DRAWS keys) through `Sampling.__call__`:
    every token outside the support is never drawn, and each token's count lies within
    5 binomial standard deviations of DRAWS * p (a false alarm has probability < 1e-6 per
    token; the keys are fixed, so the outcome is deterministic)."""
    sampler = Sampling(**config)
    keys = jax.random.split(jax.random.key(1234), DRAWS)
    draws = np.asarray(
        jax.jit(jax.vmap(lambda key: sampler(jnp.asarray(LOGITS), key)))(keys)
    )  # [DRAWS, B]
    assert draws.shape == (DRAWS, LOGITS.shape[0])
    ref = reference_probabilities(LOGITS, **config)
    for b in range(LOGITS.shape[0]):
        counts = np.bincount(draws[:, b], minlength=LOGITS.shape[1])
        assert counts.sum() == DRAWS
        outside = ref[b] == 0
        assert counts[outside].sum() == 0, (
            f"row {b}: drew tokens {np.flatnonzero(outside & (counts > 0))} outside the support"
        )
        expected = DRAWS * ref[b]
        sigma = np.sqrt(DRAWS * ref[b] * (1 - ref[b]))
        bad = np.abs(counts - expected) > 5 * sigma + 1e-9
        assert not bad.any(), (
            f"row {b}: counts {counts[bad]} vs expected {expected[bad].round(1)} (5 sigma {5 * sigma[bad]})"
        )


def test_rows_draw_independently():
    """Two identical rows in one batch get independent draws (not one shared choice)."""
    logits = jnp.asarray(np.stack([LOGITS[0], LOGITS[0]]))
    keys = jax.random.split(jax.random.key(7), 2000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: Sampling(temperature=1.0)(logits, k)))(keys))
    agree = (draws[:, 0] == draws[:, 1]).mean()
    p = reference_probabilities(LOGITS[:1], 1.0)[0]
    expected = (p**2).sum()  # chance that two independent draws coincide
    assert abs(agree - expected) < 5 * np.sqrt(expected * (1 - expected) / 2000), (agree, expected)
