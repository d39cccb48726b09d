"""zspa_jax.pruning: exact parity with the eager PyTorch oracle, properties, validation.

Shapes are few and fixed on purpose (every new shape/keep/core size compiles once);
variety comes from looping over seeds and data kinds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.support.pruning_data import assert_same, check_valid, make_data
from tests.support.torch_reference_pruning import select_tokens_reference
from zspa_jax import pruning
from zspa_jax.methods.zspaprune import select_fixed_core
from zspa_jax.pruning import PRUNE_METHODS, PruneConfig, gather_tokens, select_tokens

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    # The oracle runs on tiny tensors; with 2 shared cores, torch's spinning worker threads
    # only fight JAX's and other jobs' threads. Restored afterwards for other test files.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def jax_select(v, p, m, **kw) -> np.ndarray:
    out = select_tokens(jnp.asarray(v), jnp.asarray(p), None if m is None else jnp.asarray(m), **kw)
    assert out.dtype == jnp.int32
    return np.asarray(out)


def torch_select(v, p, m, **kw) -> np.ndarray:
    tm = None if m is None else torch.from_numpy(np.array(m))
    return select_tokens_reference(
        torch.from_numpy(np.array(v)), torch.from_numpy(np.array(p)), tm, **kw
    ).numpy()


def cosine64(v: np.ndarray) -> np.ndarray:
    vn = v.astype(np.float64) / np.maximum(
        np.linalg.norm(v.astype(np.float64), axis=-1, keepdims=True), 1e-6
    )
    return vn


# --------------------------------------------------------------------------- parity with the torch oracle

SHAPE = dict(b=4, n=40, t=6, d=16)
K = 10
# (method, core_ratio): core sizes 0, 3, 6, 10 -> four compiles shared by all seeds.
PARITY_CASES = [
    ("zspaprune", 0.6),
    ("zspaprune", 0.3),
    ("relevance", 0.6),
    ("divprune", 0.6),
    ("uniform", 0.6),
]


@pytest.mark.parametrize("method,r", PARITY_CASES)
def test_matches_torch_reference(method, r):
    for seed in range(24):
        kind = "clustered" if seed % 2 else "gauss"
        v, p, m = make_data(seed, **SHAPE, kind=kind)
        core = {"core_ratio": r} if method == "zspaprune" else {}  # the others have no core_ratio
        got = jax_select(v, p, m, keep=K, method=method, **core)
        check_valid(got, SHAPE["b"], SHAPE["n"], K)
        assert_same(
            got, torch_select(v, p, m, keep=K, method=method, core_ratio=r), f"seed {seed} {kind}"
        )


@pytest.mark.parametrize(
    "b,n,t,d,keep,r",
    [
        (2, 7, 3, 5, 7, 0.6),  # K == N
        (3, 33, 1, 8, 1, 0.6),  # K == 1, core of 1 (relevance argmax)
        (3, 33, 1, 8, 1, 0.4),  # K == 1, core of 0 -> DivPrune's first pick only
        (2, 33, 4, 8, 32, 0.5),  # K == N - 1, k = 16 (half rounds up)
        (1, 300, 9, 64, 37, 0.3),  # larger N
        (2, 12, 5, 3, 6, 0.0),  # tiny D: many near-collinear tokens
    ],
)
@pytest.mark.slow
def test_matches_torch_reference_special_shapes(b, n, t, d, keep, r):
    for seed in range(4):
        kind = "clustered" if seed % 2 else "gauss"
        v, p, m = make_data(100 + seed, b, n, t, d, kind=kind)
        got = jax_select(v, p, m, keep=keep, core_ratio=r)
        check_valid(got, b, n, keep)
        assert_same(got, torch_select(v, p, m, keep=keep, core_ratio=r), f"seed {seed} {kind}")


def _prefix_picks_made(v, p, m, keep: int, r: float) -> tuple[int, int]:
    """(picks the fill's prefix decided, fill picks) for one example, as `_select_one` runs it."""
    from zspa_jax.methods._common import prompt_relevance, unit
    from zspa_jax.methods.zspaprune import _prefix_phase, prefix_size

    vn = unit(jnp.asarray(v))
    k = pruning.core_size(keep, r)
    core = jax.lax.top_k(prompt_relevance(vn, jnp.asarray(p), jnp.asarray(m)), k)[1].astype(
        jnp.int32
    )
    c = jnp.max(vn @ vn[core].T, axis=1)
    blocked = jnp.zeros(v.shape[0], bool).at[core].set(True)
    picks = jnp.zeros(keep, jnp.int32).at[:k].set(core)
    size = prefix_size(v.shape[0], keep - k)
    assert size is not None
    t, _ = _prefix_phase(vn, c, blocked, picks, k, keep, size)
    return int(t), keep - k


@pytest.mark.parametrize("kind", ["gauss", "clustered"])
def test_prefix_fill_matches_reference_when_it_decides_and_when_it_falls_back(kind):
    # N large enough for the fill's prefix (zspaprune.prefix_size: 56 of 160 rows here).
    # Unstructured tokens stay inside it for every pick; clusters leave it after a few picks
    # and the plain loop finishes. Both must give the oracle's indices, ragged rows too.
    b, n, t, d, keep, r = 3, 160, 5, 24, 24, 0.5
    v, p, m = make_data(40 if kind == "gauss" else 41, b, n, t, d, kind=kind)
    made = [_prefix_picks_made(v[i], p[i], m[i], keep, r) for i in range(b)]
    if kind == "gauss":
        assert all(t == count for t, count in made), made
    else:
        assert all(t < count for t, count in made), made
    got = jax_select(v, p, m, keep=keep, core_ratio=r)
    assert_same(got, torch_select(v, p, m, keep=keep, core_ratio=r), kind)
    plain = np.asarray(
        select_fixed_core(
            jnp.asarray(v),
            jnp.asarray(p),
            jnp.asarray(m),
            keep=keep,
            n_core=pruning.core_size(keep, r),
            batching="vmap",
        )
    )  # no prefix under vmap
    assert np.array_equal(got, plain)
    counts = [160, 120, 90]  # ragged rows: padding at the end holds NaN
    valid = np.arange(n)[None, :] < np.array(counts)[:, None]
    garbage = np.where(valid[..., None], v, np.nan).astype(np.float32)
    got = jax_select(garbage, p, m, keep=keep, core_ratio=r, visual_mask=jnp.asarray(valid))
    for i, count in enumerate(counts):
        want = torch_select(
            v[i : i + 1, :count], p[i : i + 1], m[i : i + 1], keep=keep, core_ratio=r
        )
        assert_same(got[i : i + 1], want, f"{kind} row {i} ({count} real tokens)")


def test_exact_ties_go_to_lower_index():
    # Axis-aligned tokens with duplicates: every cosine is exactly 0 or 1 under any
    # summation order, so all ties are exact and must resolve to the lower index.
    n, d = 12, 4
    axes = np.array([0, 1, 2, 0, 3, 1, 2, 3, 0, 0, 2, 1])
    v = (np.eye(d)[axes] * np.arange(1, n + 1)[:, None]).astype(np.float32)[None]
    p = np.eye(d)[[0]].astype(np.float32)[None]  # prompt along axis 0: tokens 0,3,8,9 tie at s=1
    # relevance: the 2 best are the lowest-index tokens on axis 0
    assert jax_select(v, p, None, keep=2, method="relevance").tolist() == [[0, 3]]
    # zspaprune K=5, r=0.6 -> k=3: core {0,3,8}; fill: c=1 on axis 0, 0 elsewhere -> the
    # lowest unselected index with c=0 is 1 (axis 1); then c=0 only on axes 2, 3 -> 2
    assert jax_select(v, p, None, keep=5, core_ratio=0.6).tolist() == [[0, 1, 2, 3, 8]]
    # divprune K=4: every token has a duplicate axis (max off-diag = 1) -> first pick 0,
    # then one token per remaining axis, lowest index first: 1, 2, 4
    assert jax_select(v, p, None, keep=4, method="divprune").tolist() == [[0, 1, 2, 4]]
    for keep, method in [(2, "relevance"), (5, "zspaprune"), (4, "divprune"), (7, "zspaprune")]:
        assert_same(
            jax_select(v, p, None, keep=keep, method=method),
            torch_select(v, p, None, keep=keep, method=method),
            method,
        )


def test_prefix_fill_ties_at_its_boundary_and_inside_it():
    # Axis-aligned tokens: every cosine is exactly 0 or 1, so ties are exact. K = 8, r = 0.5:
    # core {0, 1, 2, 3} (prompt along axis 0), 4 fill picks, a prefix of 24 tokens.
    n, d, keep = 64, 4, 8
    p = np.eye(d)[[0]].astype(np.float32)[None]

    def tokens(axes):
        return np.eye(d)[axes].astype(np.float32)[None]

    # Tokens 0-39 on axis 0, 40-63 on axes 1, 2, 3 in turn: the prefix is tokens 40-63
    # (c = 0); the fill takes 40, 41, 42, after which every c is 1, inside the prefix and
    # at the smallest bound outside it (token 4). The next pick is token 4, the lowest index
    # overall, which the prefix cannot see: it must hand over to the plain loop.
    v = tokens(np.r_[np.zeros(40, int), 1 + np.arange(24) % 3])
    got = jax_select(v, p, None, keep=keep, core_ratio=0.5)
    assert got.tolist() == [[0, 1, 2, 3, 4, 40, 41, 42]]
    assert_same(got, torch_select(v, p, None, keep=keep, core_ratio=0.5), "boundary tie")

    # Only 28 real tokens (0-11 on axis 0, 12-27 on axes 1-3): all 24 unselected ones sit in
    # the prefix, ordered by bound (12-27 first, then 4-11). After 12, 13, 14 every c is 1:
    # the tie goes to the lowest token index (4), not to the first prefix position (15).
    axes = np.r_[np.zeros(12, int), 1 + np.arange(16) % 3, np.zeros(n - 28, int)]
    valid = np.arange(n)[None, :] < 28
    got = jax_select(
        tokens(axes), p, None, keep=keep, core_ratio=0.5, visual_mask=jnp.asarray(valid)
    )
    assert got.tolist() == [[0, 1, 2, 3, 4, 12, 13, 14]]
    assert_same(
        got, torch_select(tokens(axes)[:, :28], p, None, keep=keep, core_ratio=0.5), "tie inside"
    )


def test_signed_zero_scores_tie_by_index():
    # All-masked prompt -> p = 0 -> every score is zero. A dot product that starts its sum
    # from the first product (some GPU/TPU kernels) gives -0.0 for all-negative tokens; zeros
    # must still tie by index (lax.top_k alone orders -0.0 below +0.0, hence the clean-up).
    v = np.array([[-1.0, -2.0], [1.0, 2.0], [-3.0, -1.0], [2.0, 1.0]], np.float32)[None]
    p = np.ones((1, 2, 2), np.float32)
    m = np.zeros((1, 2), bool)
    assert jax_select(v, p, m, keep=2, method="relevance").tolist() == [[0, 1]]


# --------------------------------------------------------------------------- properties


def test_relevance_is_topk_cosine():
    for seed in range(6):
        v, p, m = make_data(200 + seed, **SHAPE)
        got = jax_select(v, p, m, keep=K, method="relevance")
        for b in range(SHAPE["b"]):
            mb = m[b]
            pm = p[b][mb].astype(np.float64).sum(0) / max(mb.sum(), 1)
            pm = pm / max(np.linalg.norm(pm), 1e-6)
            s = cosine64(v[b]) @ pm
            want = np.sort(np.argsort(-s, kind="stable")[:K])
            assert got[b].tolist() == want.tolist(), (seed, b)


def brute_force_divprune(v: np.ndarray, keep: int) -> list[int]:
    """Greedy max-min from the definition, float64, no running state."""
    sim = cosine64(v) @ cosine64(v).T
    n = len(v)
    first = min(range(n), key=lambda j: (max(sim[j, i] for i in range(n) if i != j), j))
    chosen = [first]
    while len(chosen) < keep:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(min(rest, key=lambda j: (max(sim[j, i] for i in chosen), j)))
    return sorted(chosen)


def test_divprune_matches_brute_force():
    for seed in range(8):
        v, p, m = make_data(300 + seed, **SHAPE, kind="clustered" if seed % 2 else "gauss")
        got = jax_select(v, p, m, keep=K, method="divprune")
        for b in range(SHAPE["b"]):
            assert got[b].tolist() == brute_force_divprune(v[b], K), (seed, b)


def test_invariant_to_positive_token_scaling():
    v, p, m = make_data(7, **SHAPE, kind="clustered")
    base = jax_select(v, p, m, keep=K, core_ratio=0.6)
    rng = np.random.default_rng(0)
    # Powers of two scale norms exactly, so the unit vectors are bit-identical.
    pow2 = (2.0 ** rng.integers(-6, 7, (SHAPE["b"], SHAPE["n"], 1))).astype(np.float32)
    assert np.array_equal(jax_select(v * pow2, p, m, keep=K, core_ratio=0.6), base)
    # Arbitrary positive scales change unit vectors by an ulp at most: same indices here.
    for seed in range(4):
        scale = (
            np.random.default_rng(seed)
            .uniform(0.01, 100.0, (SHAPE["b"], SHAPE["n"], 1))
            .astype(np.float32)
        )
        assert np.array_equal(jax_select(v * scale, p, m, keep=K, core_ratio=0.6), base)
    # Scaling the prompt by a positive factor does not change anything either.
    assert np.array_equal(jax_select(v, p * 4.0, m, keep=K, core_ratio=0.6), base)


def test_masked_prompt_tokens_have_no_effect():
    v, p, m = make_data(11, **SHAPE)
    m[:, 0] = True  # at least one real token per row
    m[:, -1] = False
    base = jax_select(v, p, m, keep=K, core_ratio=0.6)
    for fill in (1e6, -3.0, np.nan, np.inf):
        p2 = np.where(m[..., None], p, np.float32(fill)).astype(np.float32)
        assert np.array_equal(jax_select(v, p2, m, keep=K, core_ratio=0.6), base), fill
    # Same as dropping the masked tokens of a row altogether.
    b0 = p[0][m[0]][None]
    assert np.array_equal(jax_select(v[:1], b0, None, keep=K, core_ratio=0.6), base[:1])
    # Integer masks mean the same as boolean ones.
    assert np.array_equal(jax_select(v, p, m.astype(np.int32), keep=K, core_ratio=0.6), base)


def test_non_finite_values_name_their_row_and_large_finite_ones_pass():
    v, p, m = make_data(13, **SHAPE)
    valid = np.ones(v.shape[:2], bool)
    valid[2, -3:] = False
    for name, bad in (("visual", 1), ("prompt", 3)):
        for value in (np.nan, np.inf, -np.inf):
            arrays = {"visual": v.copy(), "prompt": p.copy()}
            arrays[name][bad, 1, 2] = value
            with pytest.raises(ValueError, match=f"{name} row {bad} holds NaN or Inf"):
                select_tokens(
                    jnp.asarray(arrays["visual"]),
                    jnp.asarray(arrays["prompt"]),
                    jnp.asarray(m),
                    keep=K,
                )
    # Values whose square overflows float32 are still finite; masked visual slots may hold anything.
    huge, garbage = v.copy(), v.copy()
    huge[0, 0, 0] = 3e38
    garbage[2, -1, :] = np.inf
    assert select_tokens(jnp.asarray(huge), jnp.asarray(p), jnp.asarray(m), keep=K).shape == (
        SHAPE["b"],
        K,
    )
    got = select_tokens(
        jnp.asarray(garbage), jnp.asarray(p), jnp.asarray(m), keep=K, visual_mask=jnp.asarray(valid)
    )
    assert np.array_equal(
        got,
        select_tokens(
            jnp.asarray(v), jnp.asarray(p), jnp.asarray(m), keep=K, visual_mask=jnp.asarray(valid)
        ),
    )


def test_all_masked_prompt_is_zero_prompt():
    v, p, _ = make_data(12, **SHAPE, kind="clustered")
    m = np.zeros(p.shape[:2], bool)
    got = jax_select(v, p, m, keep=K, core_ratio=0.6)
    zero = jax_select(v, np.zeros_like(p), None, keep=K, core_ratio=0.6)
    assert np.array_equal(got, zero)
    k = pruning.core_size(K, 0.6)
    assert (got[:, :k] == np.arange(k)).all()  # all scores 0 -> core = lowest indices
    assert_same(got, torch_select(v, p, m, keep=K, core_ratio=0.6), "all masked")


def test_batch_equals_per_example():
    v, p, m = make_data(13, **SHAPE, kind="clustered")
    batched = jax_select(v, p, m, keep=K, core_ratio=0.6)
    for b in range(SHAPE["b"]):
        one = jax_select(v[b : b + 1], p[b : b + 1], m[b : b + 1], keep=K, core_ratio=0.6)
        assert np.array_equal(one[0], batched[b])


@pytest.mark.slow
def test_jit_equals_eager_and_batching_strategies_agree():
    v, p, m = make_data(14, 1, 16, 3, 8, kind="clustered")  # B = 1: eager mode is slow per op
    args = (jnp.asarray(v), jnp.asarray(p), jnp.asarray(m))
    for r in (0.0, 0.5):
        k = pruning.core_size(6, r)
        mapped = np.asarray(select_fixed_core(*args, keep=6, n_core=k, batching="map"))
        vmapped = np.asarray(select_fixed_core(*args, keep=6, n_core=k, batching="vmap"))
        assert np.array_equal(mapped, vmapped)
    # Eager mode compiles every op once, so one case only (core + fill).
    with jax.disable_jit():
        eager = np.asarray(select_fixed_core(*args, keep=6, n_core=k, batching="map"))
    assert np.array_equal(mapped, eager)
    # Inside a user's jit (keep static through the closure).
    inner = jax.jit(lambda v, p, m: select_tokens(v, p, m, keep=6, core_ratio=0.5))
    assert np.array_equal(np.asarray(inner(*args)), jax_select(v, p, m, keep=6, core_ratio=0.5))


def test_keep_equals_n_is_arange():
    v, p, m = make_data(15, 2, 9, 2, 4)
    for method in ("zspaprune", "divprune", "relevance", "uniform"):
        assert (jax_select(v, p, m, keep=9, method=method) == np.arange(9)).all()


def test_uniform_formula():
    v, p, m = make_data(16, 2, 50, 2, 4)
    for keep in (1, 7, 16, 49, 50):
        want = [math.floor((i + 0.5) * 50 / keep) for i in range(keep)]
        got = jax_select(v, p, m, keep=keep, method="uniform")
        assert (got == np.array(want)).all(), keep


def test_random_method():
    v, p, m = make_data(17, **SHAPE)
    key = jax.random.key(0)
    a = jax_select(v, p, m, keep=K, method="random", rng=key)
    check_valid(a, SHAPE["b"], SHAPE["n"], K)
    assert np.array_equal(a, jax_select(v, p, m, keep=K, method="random", rng=key))  # reproducible
    assert not np.array_equal(
        a, jax_select(v, p, m, keep=K, method="random", rng=jax.random.key(1))
    )
    assert len({tuple(r) for r in a}) > 1  # each row draws its own subset
    legacy = jax_select(
        v, p, m, keep=K, method="random", rng=jax.random.PRNGKey(0)
    )  # raw uint32 keys work
    check_valid(legacy, SHAPE["b"], SHAPE["n"], K)
    # Roughly uniform: every index gets picked over many keys.
    counts = np.zeros(SHAPE["n"])
    for s in range(40):
        np.add.at(
            counts, jax_select(v, p, m, keep=K, method="random", rng=jax.random.key(s)).ravel(), 1
        )
    assert counts.min() > 0


def test_bf16_inputs_equal_upcast_f32():
    # Guarantee: inputs are cast to f32 first, so low-precision inputs give exactly the
    # indices of the same values upcast to f32 (and hence match the torch oracle on those).
    v, p, m = make_data(18, **SHAPE, kind="clustered")
    for dt in (jnp.bfloat16,):  # (float16 behaves the same way: cast first)
        vb, pb = jnp.asarray(v).astype(dt), jnp.asarray(p).astype(dt)
        got = np.asarray(select_tokens(vb, pb, jnp.asarray(m), keep=K))
        up = np.asarray(
            select_tokens(vb.astype(jnp.float32), pb.astype(jnp.float32), jnp.asarray(m), keep=K)
        )
        assert np.array_equal(got, up)
        assert_same(
            got,
            torch_select(
                np.asarray(vb.astype(jnp.float32)), np.asarray(pb.astype(jnp.float32)), m, keep=K
            ),
            str(dt),
        )


def test_gather_tokens():
    v, p, m = make_data(19, **SHAPE)
    idx = jax_select(v, p, m, keep=K)
    out = np.asarray(gather_tokens(jnp.asarray(v), jnp.asarray(idx)))
    assert out.shape == (SHAPE["b"], K, SHAPE["d"])
    for b in range(SHAPE["b"]):
        assert np.array_equal(out[b], v[b][idx[b]])
    with pytest.raises(ValueError, match="indices"):
        gather_tokens(jnp.asarray(v), jnp.asarray(idx[0]))


def test_no_recompile_for_same_shapes():
    impl = select_fixed_core
    v, p, m = make_data(20, **SHAPE)
    jax_select(v, p, m, keep=K, core_ratio=0.6)
    before = impl._cache_size()
    for seed in range(3):
        v, p, m = make_data(21 + seed, **SHAPE)
        jax_select(v, p, m, keep=K, core_ratio=0.6)
        jax_select(v, p, m, keep=K, core_ratio=float(np.float64(0.6)))  # numpy scalar, same key
    assert impl._cache_size() == before
    # relevance and zspaprune with r = 1 reduce to the same core size: one compile.
    jax_select(v, p, m, keep=K, core_ratio=1.0)
    n1 = impl._cache_size()
    jax_select(v, p, m, keep=K, method="relevance")
    assert impl._cache_size() == n1


# --------------------------------------------------------------------------- validation

_V = jnp.zeros((2, 8, 4))
_P = jnp.ones((2, 3, 4))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(keep=0), "keep"),
        (dict(keep=9), "keep"),
        (dict(keep=2.0), "keep"),
        (dict(keep=2, core_ratio=1.5), "core_ratio"),
        (dict(keep=2, core_ratio=-0.1), "core_ratio"),
        (dict(keep=2, prompt=jnp.ones((2, 3, 5))), "prompt feature dim"),
        (dict(keep=2, prompt=jnp.ones((3, 3, 4))), "prompt batch"),
        (dict(keep=2, prompt=jnp.ones((3, 4))), "prompt"),
        (dict(keep=2, visual=jnp.zeros((8, 4))), "visual"),
        (dict(keep=2, visual=jnp.zeros((2, 8, 4), jnp.int32)), "visual"),
        (dict(keep=2, prompt=jnp.ones((2, 3, 4), jnp.int32)), "prompt"),
        (dict(keep=2, prompt_mask=jnp.ones((2, 4), bool)), "prompt_mask"),
        (dict(keep=2, prompt_mask=jnp.ones((2,), bool)), "prompt_mask"),
        (dict(keep=2, method="random"), "rng"),
        (dict(keep=2, method="nope"), "method"),
    ],
)
def test_validation_errors(kwargs, name):
    args = dict(visual=_V, prompt=_P, prompt_mask=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as err:
        select_tokens(args.pop("visual"), args.pop("prompt"), args.pop("prompt_mask"), **args)
    if name == "method":
        assert all(m in str(err.value) for m in PRUNE_METHODS)
    if kwargs.get("keep") == 9:
        assert "N=8" in str(err.value)


def test_validation_happens_at_trace_time():
    with pytest.raises(ValueError, match="keep"):
        jax.jit(lambda v, p: select_tokens(v, p, keep=20))(_V, _P)


def test_prune_config():
    c = PruneConfig(ratio=0.25)
    assert c.num_keep(576) == 144 and c.num_keep(3) == 1  # 0.75 + 0.5 -> 1
    assert PruneConfig(ratio=0.5).num_keep(5) == 3  # 2.5 rounds half up
    assert PruneConfig(ratio=0.01).num_keep(10) == 1  # at least one
    assert PruneConfig(ratio=1.0).num_keep(577) == 577
    assert PruneConfig(keep=64).num_keep(576) == 64
    with pytest.raises(ValueError, match=r"keep=64.*n_visual=10"):
        PruneConfig(keep=64).num_keep(10)
    # hashable, usable as a static jit argument, equal configs hash equal
    assert hash(PruneConfig(keep=8)) == hash(PruneConfig(keep=8)) and PruneConfig(
        keep=8
    ) == PruneConfig(keep=8)
    f = jax.jit(lambda x, cfg: x * cfg.num_keep(x.shape[0]), static_argnums=1)
    assert int(f(jnp.ones(10), PruneConfig(ratio=0.3))[0]) == 3
    with pytest.raises(AttributeError):
        c.keep = 3  # frozen


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(), "keep or ratio"),
        (dict(keep=4, ratio=0.5), "keep or ratio"),
        (dict(keep=0), "keep"),
        (dict(keep=2.5), "keep"),
        (dict(keep=True), "keep"),
        (dict(ratio=0.0), "ratio"),
        (dict(ratio=1.5), "ratio"),
        (dict(keep=4, method="nope"), "method"),
        (dict(keep=4, core_ratio=2.0), "core_ratio"),
        (dict(keep=4, prompt_scope="image"), "prompt_scope"),
    ],
)
def test_prune_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PruneConfig(**kwargs)
