"""A KV cache too short for the prompt plus max_new_tokens is an error, never a short answer.

Two images with budget="image" keep I x K tokens; sizing the cache from K alone (the
per-image keep) leaves it I x K - K slots short, which only shows when the shortfall
crosses a cache bucket: max_new_tokens here is one slot past one. With EOS impossible
(`eos_token_id=[]`), the answer must then have exactly max_new_tokens tokens, or the call
must raise a ValueError naming the cache length and what it needed.
"""

from __future__ import annotations

import numpy as np
import pytest

import zspa_jax
from zspa_jax import generation
from zspa_jax.host import round_up
from zspa_jax.pruning import PruneConfig

KEEP, IMAGES = 4, 2
PRUNE = PruneConfig(keep=KEEP, budget="image")


@pytest.fixture(scope="module")
def tiny(tiny_hf_llava):
    return tiny_hf_llava("gen")


@pytest.fixture(scope="module")
def vlm(tiny, converted):
    return zspa_jax.load(converted(tiny.path))


@pytest.fixture(scope="module")
def case(tiny):
    """ids [1, L] of two images whose pruned prompt fills a prompt bucket exactly, pixels,
    the pruned prompt's length and max_new_tokens one slot past a cache bucket."""
    n = tiny.tokens_per_image
    rng = np.random.default_rng(7)
    image = np.full(n, tiny.image_token_index)
    pruned = 16  # a prompt bucket: generate adds no left padding
    text = pruned - 1 - IMAGES * KEEP
    ids = np.concatenate(
        [
            [tiny.bos_token_id],
            rng.integers(10, 290, 3),
            image,
            image,
            rng.integers(10, 290, text - 3),
        ]
    ).astype(np.int64)
    assert len(ids) - IMAGES * (n - KEEP) == pruned
    assert generation.prompt_bucket(pruned) == pruned
    new = generation.CACHE_BUCKET - pruned + 1  # prompt + new = one slot past a cache bucket
    size = tiny.image_size
    pixels = np.random.default_rng(8).standard_normal((IMAGES, 3, size, size)).astype(np.float32)
    return dict(ids=ids[None], pixels=pixels, pruned=pruned, new=new)


def _size_from_keep_alone(monkeypatch):
    """The cache sized with K per row instead of I x K (what a wrong sizing would do)."""
    monkeypatch.setattr(generation, "kept_per_row", lambda prune, batch: prune.keep)


def test_a_cache_sized_for_every_kept_token_gives_the_whole_answer(vlm, case):
    new = case["new"]
    out = zspa_jax.generate(
        vlm,
        input_ids=case["ids"],
        pixel_values=case["pixels"],
        prune=PRUNE,
        max_new_tokens=new,
        eos_token_id=[],
    )
    assert out.sequences.shape == (1, new)
    assert out.stats["new_tokens_per_row"] == [new]
    assert out.stats["visual_tokens_kept_per_row"] == IMAGES * KEEP
    assert out.stats["cache_length"] == round_up(case["pruned"] + new, generation.CACHE_BUCKET)
    tokens = zspa_jax.generate_tokens(
        vlm,
        case["ids"],
        case["pixels"],
        max_new_tokens=new,
        prune=PRUNE,
        eos_token_id=[],
    )
    assert np.asarray(tokens.lengths).tolist() == [new]
    np.testing.assert_array_equal(np.asarray(tokens.tokens)[:, :new], out.sequences)


def test_a_cache_sized_from_the_per_image_keep_is_an_error(vlm, case, monkeypatch):
    _size_from_keep_alone(monkeypatch)
    pruned, new = case["pruned"], case["new"]
    short = round_up(pruned - (IMAGES - 1) * KEEP + new, generation.CACHE_BUCKET)
    assert short < pruned + new  # the wrong sizing really is a bucket short
    message = rf"KV cache holds {short} slots.*max_new_tokens \({new}\) needs {pruned + new}"
    kw = dict(prune=PRUNE, max_new_tokens=new, eos_token_id=[])
    with pytest.raises(ValueError, match=message):
        zspa_jax.generate(vlm, input_ids=case["ids"], pixel_values=case["pixels"], **kw)
    with pytest.raises(ValueError, match=message):
        zspa_jax.generate_tokens(vlm, case["ids"], case["pixels"], **kw)


def test_the_decode_path_refuses_a_buffer_shorter_than_max_new_tokens(vlm, case, monkeypatch):
    """With the host's check out of the way too, the prefill's token buffer is checked
    before decoding: the error, not an answer one token short."""
    _size_from_keep_alone(monkeypatch)
    real, calls = generation.check_cache_room, []

    def skip_the_settings_check(*args):
        calls.append(args)
        if len(calls) > 1:  # the first call sizes the settings; later ones guard decoding
            real(*args)

    monkeypatch.setattr(generation, "check_cache_room", skip_the_settings_check)
    kw = dict(
        input_ids=case["ids"],
        pixel_values=case["pixels"],
        prune=PRUNE,
        max_new_tokens=case["new"],
        eos_token_id=[],
    )
    with pytest.raises(ValueError, match=rf"max_new_tokens \({case['new']}\) needs"):
        zspa_jax.generate(vlm, **kw)
    calls.clear()
    with pytest.raises(ValueError, match=rf"max_new_tokens \({case['new']}\) needs"):
        list(zspa_jax.generate(vlm, **kw, stream=True))
