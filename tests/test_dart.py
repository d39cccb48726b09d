"""DART selection kernel (zspa_jax.methods.dart) against the eager PyTorch reference.

Shapes are few on purpose (each (shape, keep, pivots) compiles once); variety comes from
seeds. Padding (left padding of the sequence, padding slots inside the span) holds NaN, so
any read of it would show up as a changed or invalid selection.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.torch_reference_dart import dart_select_reference, rms_norm
from zspa_jax.methods.dart import dart_flops, dart_select

D, HEADS, DH = 32, 2, 8


def make_batch(
    seed: int,
    n: int,
    rows: list[tuple[int, int]],
    length: int,
    holes: list[list[int]] | None = None,
):
    """rows: (tokens before the span, text tokens after it) per row, left-padded to `length`.
    holes: span slots per row that are padding (visual_valid False). Returns numpy arrays."""
    rng = np.random.default_rng(seed)
    b = len(rows)
    hidden = np.full((b, length, D), np.nan, np.float32)
    keys = np.full((b, length, HEADS, DH), np.nan, np.float32)
    start = np.zeros((b,), np.int32)
    text = np.zeros((b, length), bool)
    valid = np.ones((b, n), bool)
    for i, (pre, t) in enumerate(rows):
        pad = length - pre - n - t
        assert pad >= 0
        real = pre + n + t
        h = rng.standard_normal((real, D)).astype(np.float32)
        centers = rng.standard_normal((5, D)).astype(
            np.float32
        )  # clustered (duplicated) visual tokens
        h[pre : pre + n] = centers[rng.integers(0, 5, n)] + 0.6 * rng.standard_normal((n, D))
        scale = rng.uniform(0.2, 2.0, (real, 1, 1)).astype(np.float32)
        hidden[i, pad:] = h
        keys[i, pad:] = scale * rng.standard_normal((real, HEADS, DH)).astype(np.float32)
        start[i] = pad + pre
        text[i, pad + pre + n :] = True
        if holes is not None:
            for j in holes[i]:
                valid[i, j] = False
                hidden[i, pad + pre + j] = np.nan
                keys[i, pad + pre + j] = np.nan
    weight = rng.uniform(0.5, 1.5, (D,)).astype(np.float32)
    return hidden, keys, start, text, valid, weight


def run_jax(hidden, keys, start, text, valid=None, weight=None, **kw):
    """dart_select on numpy inputs. valid/weight default to all-real / ones (passed as arrays,
    so most tests share compiled programs; the None paths have their own test)."""
    b, n = hidden.shape[0], kw["num_visual"]
    valid = np.ones((b, n), bool) if valid is None else valid
    weight = np.ones((hidden.shape[2],), np.float32) if weight is None else weight
    return run_jax_raw(hidden, keys, start, text, valid, weight, **kw)


def run_jax_raw(hidden, keys, start, text, valid, weight, **kw):
    out = dart_select(
        jnp.asarray(hidden),
        jnp.asarray(keys),
        jnp.asarray(start),
        jnp.asarray(text),
        visual_valid=None if valid is None else jnp.asarray(valid),
        norm_weight=None if weight is None else jnp.asarray(weight),
        **kw,
    )
    return np.asarray(out)


def run_torch(hidden, keys, start, text, valid=None, weight=None, **kw):
    out = dart_select_reference(
        torch.from_numpy(hidden),
        torch.from_numpy(keys),
        torch.from_numpy(start),
        torch.from_numpy(text),
        visual_valid=None if valid is None else torch.from_numpy(valid),
        norm_weight=None if weight is None else torch.from_numpy(weight),
        **kw,
    )
    return out.numpy()


def check_well_formed(idx: np.ndarray, n: int, keep: int, valid: np.ndarray | None = None):
    assert idx.dtype == np.int32 and idx.shape[1] == keep
    assert np.all(np.diff(idx, axis=1) > 0), "ascending and unique"
    assert idx.min() >= 0 and idx.max() < n
    if valid is not None:
        assert np.take_along_axis(valid, idx, axis=1).all(), "a padding slot was chosen"


ROWS = [
    (3, 9),
    (5, 4),
    (2, 12),
]  # (before span, text after): three different span starts
N, LENGTH = (
    16,
    36,
)  # the shape most tests share (one compiled program per keep / pivots)
KEEPS = {16: (1, 5, 16), 40: (1, 28, 40), 64: (7, 64)}


@pytest.mark.parametrize("n", sorted(KEEPS))
@pytest.mark.slow
def test_matches_reference(n):
    for keep in KEEPS[n]:
        for seed in range(3):
            hidden, keys, start, text, _, weight = make_batch(seed, n, ROWS, n + 20)
            got = run_jax(hidden, keys, start, text, weight=weight, num_visual=n, keep=keep)
            want = run_torch(hidden, keys, start, text, weight=weight, num_visual=n, keep=keep)
            check_well_formed(got, n, keep)
            np.testing.assert_array_equal(got, want, err_msg=f"n={n} keep={keep} seed={seed}")


def test_none_paths():
    """visual_valid=None is all-real; norm_weight=None uses `hidden` as given, and
    pre-multiplying by the weight equals passing it (the RMS factor is invisible to cosines)."""
    keep = 5
    hidden, keys, start, text, _, weight = make_batch(4, N, ROWS, LENGTH)
    got = run_jax_raw(hidden, keys, start, text, None, None, num_visual=N, keep=keep)
    np.testing.assert_array_equal(
        got, run_torch(hidden, keys, start, text, num_visual=N, keep=keep)
    )
    np.testing.assert_array_equal(got, run_jax(hidden, keys, start, text, num_visual=N, keep=keep))
    np.testing.assert_array_equal(
        run_jax(hidden * weight, keys, start, text, num_visual=N, keep=keep),
        run_jax(hidden, keys, start, text, weight=weight, num_visual=N, keep=keep),
    )


def _official(
    last_layer_state,
    any_states,
    image_token_start_index,
    image_token_length,
    pivot_image_token,
    pivot_text_token,
    TOKEN_TOPK,
):
    """The official `get_retained_image_token` body (LLaVA, modeling_llama_self.py) for one
    example, its `for item in list(indices_set)` iterated in ascending order."""
    k_states_image_token = any_states[
        image_token_start_index : image_token_start_index + image_token_length, :
    ]
    k_states_query_token = any_states[image_token_start_index + image_token_length :, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (
        k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index
    ).tolist()
    query_indices = (
        k_states_query_token_L1_norm.topk(pivot_text_token).indices
        + image_token_start_index
        + image_token_length
    ).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(
        range(image_token_start_index, image_token_start_index + image_token_length)
    ) - set(image_indices)
    valid_indices_list = sorted(valid_indices)
    for item in sorted(indices_set):
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(
            last_layer_state[item, :], valid_vectors, dim=-1
        )
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = sorted(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def test_official_rule_when_budget_divides():
    """keep = p_i + P * t: every pivot takes exactly TOKEN_TOPK = t, as in the official code
    (final RMSNorm applied as there; text = everything after the span, as there)."""
    n, t = 40, 3
    keep = 4 + 8 * t
    for seed in range(3):
        hidden, keys, start, text, _, weight = make_batch(seed + 10, n, ROWS, n + 20)
        got = run_jax(hidden, keys, start, text, weight=weight, num_visual=n, keep=keep)
        for b in range(len(ROWS)):
            s = int(start[b])
            state = rms_norm(torch.from_numpy(hidden[b]), torch.from_numpy(weight))
            k = torch.from_numpy(keys[b]).reshape(keys.shape[1], -1)
            want = _official(state, k, s, n, 4, 4, t)
            assert len(want) == keep
            np.testing.assert_array_equal(got[b], np.array(want) - s)


def test_visual_valid_and_row_equals_itself_alone():
    """Padding slots are never chosen, and each row of the batch equals the same row run
    alone with its left padding and its span's padding slots removed (row 1 has none)."""
    holes = [[0, 5, 6, 15], [], [1, 2, 3, 10]]
    for keep in (1, 5):
        for seed in range(2):
            hidden, keys, start, text, valid, weight = make_batch(seed, N, ROWS, LENGTH, holes)
            got = run_jax(hidden, keys, start, text, valid, weight, num_visual=N, keep=keep)
            check_well_formed(got, N, keep, valid)
            np.testing.assert_array_equal(
                got,
                run_torch(hidden, keys, start, text, valid, weight, num_visual=N, keep=keep),
            )
            if keep != 5:
                continue
            for b in range(len(ROWS)):
                s = int(start[b])
                pad = s - ROWS[b][0]
                seq = [
                    p for p in range(pad, LENGTH) if not (s <= p < s + N and not valid[b, p - s])
                ]
                real = np.nonzero(valid[b])[0]
                alone = run_jax(
                    hidden[b : b + 1, seq],
                    keys[b : b + 1, seq],
                    np.array([ROWS[b][0]], np.int32),
                    text[b : b + 1, seq],
                    weight=weight,
                    num_visual=len(real),
                    keep=keep,
                )
                np.testing.assert_array_equal(
                    got[b], real[alone[0]], err_msg=f"row {b} seed={seed}"
                )


def test_ties_go_to_the_lower_index():
    hidden, keys, start, text, _, _ = make_batch(3, N, ROWS, LENGTH)
    # Every visual token identical, every key identical: all L1 norms and cosines tie, so the
    # pivots are slots 0..3 and every pick is the lowest free slot -> 0..keep-1.
    same_h, same_k = hidden.copy(), keys.copy()
    for b in range(len(ROWS)):
        s = int(start[b])
        same_h[b, s : s + N] = hidden[b, s]
        same_k[b, s : s + N] = keys[b, s]
    for keep in KEEPS[N]:
        got = run_jax(same_h, same_k, start, text, num_visual=N, keep=keep)
        np.testing.assert_array_equal(got, np.broadcast_to(np.arange(keep), got.shape))
        np.testing.assert_array_equal(
            got, run_torch(same_h, same_k, start, text, num_visual=N, keep=keep)
        )
    # Pairs of duplicated tokens (slot 2j+1 copies slot 2j, hidden and key): the pair ties in
    # the pivot ranking and in every cosine, so the odd copy is never kept without the even one.
    dup_h, dup_k = hidden.copy(), keys.copy()
    for b in range(len(ROWS)):
        s = int(start[b])
        dup_h[b, s + 1 : s + N : 2] = hidden[b, s : s + N : 2]
        dup_k[b, s + 1 : s + N : 2] = keys[b, s : s + N : 2]
    for keep in (1, 5):
        got = run_jax(dup_h, dup_k, start, text, num_visual=N, keep=keep)
        np.testing.assert_array_equal(
            got, run_torch(dup_h, dup_k, start, text, num_visual=N, keep=keep)
        )
        for row in got:
            assert all(j - 1 in set(row) for j in row if j % 2 == 1), row
        if keep == 1:  # the single image pivot: an even slot (ties -> lower index)
            assert np.all(got % 2 == 0)


def test_keep_equals_n_is_arange():
    hidden, keys, start, text, _, weight = make_batch(5, N, ROWS, LENGTH)
    for pivots in ((4, 4), (20, 0)):
        got = run_jax(
            hidden,
            keys,
            start,
            text,
            weight=weight,
            num_visual=N,
            keep=N,
            num_image_pivots=pivots[0],
            num_text_pivots=pivots[1],
        )
        np.testing.assert_array_equal(got, np.broadcast_to(np.arange(N), got.shape))


# (keep, (num_image_pivots, num_text_pivots)): other pivot counts, more text pivots than text
# tokens, more pivots than keep; shared by the next two tests (one program each).
CONFIGS = [
    (1, (4, 4)),
    (5, (4, 4)),
    (5, (0, 2)),
    (9, (1, 0)),
    (3, (2, 8)),
    (5, (6, 12)),
]


@pytest.mark.parametrize("config", CONFIGS[2:])
def test_pivot_counts_and_rows_without_text(config):
    """Row 0 has no text token at all (with num_image_pivots = 0 it falls back to one image
    pivot); row 1 fewer text tokens than text pivots."""
    keep, pivots = config
    rows = [(3, 0), (5, 2), (2, 12)]
    hidden, keys, start, text, _, weight = make_batch(11, N, rows, LENGTH)
    kw = {
        "num_visual": N,
        "keep": keep,
        "num_image_pivots": pivots[0],
        "num_text_pivots": pivots[1],
    }
    got = run_jax(hidden, keys, start, text, weight=weight, **kw)
    check_well_formed(got, N, keep)
    np.testing.assert_array_equal(got, run_torch(hidden, keys, start, text, weight=weight, **kw))


def test_map_equals_vmap_and_compiles_once_per_shape():
    keep = 5
    hidden, keys, start, text, _, weight = make_batch(0, N, ROWS, LENGTH)
    vmap = run_jax(hidden, keys, start, text, weight=weight, num_visual=N, keep=keep)
    np.testing.assert_array_equal(
        vmap,
        run_jax(
            hidden,
            keys,
            start,
            text,
            weight=weight,
            num_visual=N,
            keep=keep,
            batching="map",
        ),
    )
    before = dart_select._cache_size()
    for seed in (1, 2, 3):
        hidden, keys, start, text, _, weight = make_batch(seed, N, ROWS, LENGTH)
        run_jax(hidden, keys, start, text, weight=weight, num_visual=N, keep=keep)
    assert dart_select._cache_size() == before  # new data, same shapes: no new compile
    run_jax(hidden, keys, start, text, weight=weight, num_visual=N, keep=15)
    assert dart_select._cache_size() == before + 1  # keep is static: one program per keep


def test_flops():
    # LLaVA-1.5-7B: n=576, d=4096, keys 32 heads x 128 = 4096, 40 text tokens; P = 8.
    n, d, t = 576, 4096, 40
    assert dart_flops(n, d, 132, t) == (n + t) * d + 2 * (n + 8) * d + 2 * n * d * 8
    assert dart_flops(n, d, 2, 3, key_dim=1024) == (n + 3) * 1024 + 2 * (n + 5) * d + 2 * n * d * 5
    assert (
        dart_flops(n, d, 64, 0, num_image_pivots=2, num_text_pivots=0)
        == n * d + 2 * (n + 2) * d + 4 * n * d
    )


@settings(deadline=None, max_examples=25, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from(CONFIGS[:5]),
    text_counts=st.tuples(st.integers(0, 6), st.integers(1, 6), st.integers(0, 14)),
    holes=st.lists(st.sets(st.integers(0, N - 1), max_size=5), min_size=3, max_size=3),
)
@pytest.mark.slow
def test_property_matches_reference(seed, config, text_counts, holes):
    """Random text lengths (0 included), padding slots and pivot counts: same indices as the
    reference, well formed, padding never chosen."""
    keep, pivots = config
    rows = [
        (2, text_counts[0]),
        (4, text_counts[1]),
        (LENGTH - N - text_counts[2], text_counts[2]),
    ]
    hidden, keys, start, text, valid, weight = make_batch(
        seed, N, rows, LENGTH, [sorted(h) for h in holes]
    )
    kw = {
        "num_visual": N,
        "keep": keep,
        "num_image_pivots": pivots[0],
        "num_text_pivots": pivots[1],
    }
    got = run_jax(hidden, keys, start, text, valid, weight, **kw)
    check_well_formed(got, N, keep, valid)
    np.testing.assert_array_equal(got, run_torch(hidden, keys, start, text, valid, weight, **kw))
