"""Qwen2.5-VL parity against transformers (f32, tiny random models converted by the CLI).

Tower outputs after every block (windows that do not tile the grid, full-attention
blocks first and last), the merger, 3-D M-RoPE positions for many grids, and full
logits with two images in one prompt, left-padded batches and a long prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from models import qwen2_5_vl
from models.qwen2_5_vl import window_slots
from tests.support.tiny_qwen2_5_vl import converted, hf_inputs, random_image, tiny_model
from zspa_jax.families import restore_model
from zspa_jax.families.qwen2_5_vl.layout import rope_index, vision_layout

BOUND = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def model(tiny):
    return restore_model(converted(tiny))


# One jitted program per shape instead of op-by-op dispatch (much faster on CPU).
@functools.partial(jax.jit, static_argnums=(0,))
def _jit_logits(graphdef, state, ids, pixels, layout, positions, mask):
    return nnx.merge(graphdef, state)(ids, pixels, layout, positions, mask)


@functools.partial(jax.jit, static_argnums=(0,))
def _jit_tower(graphdef, state, pixels, layout):
    visual = nnx.merge(graphdef, state).visual
    return visual.blocks_out(pixels, layout), visual(pixels, layout)


def _maxdiff(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


# Image sizes in pixels (one merged token = 8 x 8 px, window = 2 x 2 merged tokens):
# 40 x 56 -> 5 x 7 merged (partial windows on both axes), 24 x 32 -> 3 x 4, 16 x 16 -> 2 x 2.
GRID_CASES = {
    "odd_grid": [(40, 56)],
    "two_images": [(24, 32), (40, 56)],
    "three_small": [(16, 16), (24, 16), (16, 40)],
}


@pytest.mark.parametrize("case", sorted(GRID_CASES))
@pytest.mark.slow
def test_tower_blocks_and_merger(tiny, model, case, parity_record, monkeypatch):
    sizes = GRID_CASES[case]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = tiny.processor.image_processor(images=images, return_tensors="pt")
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    assert [tuple(g) for g in grid.tolist()] == [(1, h // 4, w // 4) for h, w in sizes]
    with torch.no_grad():
        ref = tiny.hf.model.visual(pixels, grid_thw=grid, output_hidden_states=True)
    cfg = model.config.vision
    assert cfg.fullatt_block_indexes == (0, cfg.depth - 1)
    layout = vision_layout(grid.numpy(), cfg)
    graphdef, state = nnx.split(model)
    states, merged = _jit_tower(graphdef, state, jnp.asarray(pixels.numpy()), layout)
    assert len(states) == len(ref.hidden_states) - 1 == cfg.depth
    window_sizes = np.bincount(layout.window_segment[layout.valid])
    assert (window_sizes < window_slots(cfg)).any(), "some windows should be partial (edge windows)"
    for i, (ours, theirs) in enumerate(zip(states, ref.hidden_states[1:])):
        kind = "full" if i in cfg.fullatt_block_indexes else "window"
        d = parity_record(
            f"qwen tower block {i} ({kind})",
            case,
            _maxdiff(ours[layout.valid], theirs),
            BOUND,
            scale=float(theirs.abs().max()),
        )
        assert d <= BOUND, (i, d)
    n = ref.pooler_output.shape[0]
    assert merged.shape[0] == layout.inverse.size >= n
    d = parity_record(
        "qwen merger",
        case,
        _maxdiff(merged[:n], ref.pooler_output),
        BOUND,
        scale=float(ref.pooler_output.abs().max()),
    )
    assert d <= BOUND

    # Padding the tower to a bucket of slots (padding slots after the real patches, zero
    # pixel rows) leaves the real tokens as they were (up to the rounding of differently
    # shaped matmuls). Full-attention blocks score queries in chunks here (as they do for
    # large images), windowed blocks in chunks of a window's slots.
    monkeypatch.setattr(qwen2_5_vl, "QUERY_CHUNK", 32)
    extra = 3 * window_slots(cfg)
    padded = vision_layout(grid.numpy(), cfg, slots=layout.order.size + extra)
    assert padded.window_keys.size > 1 and padded.chunk_keys.size > 1
    rows = padded.order.size - pixels.shape[0]
    _, out = _jit_tower(
        graphdef, state, jnp.pad(jnp.asarray(pixels.numpy()), ((0, rows), (0, 0))), padded
    )
    assert out.shape[0] == merged.shape[0] + extra // cfg.merge_unit
    d = parity_record(
        "qwen merger (padded bucket)", case, _maxdiff(out[:n], ref.pooler_output), BOUND
    )
    assert d <= BOUND
    assert _maxdiff(out[:n], merged[:n]) <= 1e-5


def test_window_layout_matches_transformers(tiny):
    """Window order and segments equal transformers' get_vision_window_index / cu_seqlens."""
    from transformers.vision_utils import get_vision_window_index

    cfg = restore_model(converted(tiny)).config.vision
    for grid in ([[1, 10, 14]], [[1, 6, 8], [1, 4, 4], [1, 2, 18]], [[1, 8, 8]]):
        g = torch.tensor(grid)
        window_index, cu = get_vision_window_index(
            g, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        layout = vision_layout(np.asarray(grid), cfg)
        unit, slots = cfg.merge_unit, window_slots(cfg)
        real = layout.order[layout.valid]
        np.testing.assert_array_equal(real[::unit] // unit, window_index.numpy())
        sizes = np.bincount(
            layout.window_segment[layout.valid]
        )  # real patches per window, in window order
        assert sizes.max() <= slots
        np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes)]), cu.numpy())
        merged_slot_of_real = np.flatnonzero(
            layout.valid[::unit]
        )  # merged slots that hold real tokens
        np.testing.assert_array_equal(
            layout.inverse[: real.size // unit],
            merged_slot_of_real[np.argsort(window_index.numpy())],
        )


def _prompt_ids(tiny, rng, pieces) -> list[int]:
    """pieces: ints (that many random words) or (t, h, w) grids (vision_start, pads, vision_end)."""
    tok = tiny.processor.tokenizer
    words = [i for i in range(1, 30)]
    cfg = tiny.config
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += list(rng.choice(words, size=piece))
        else:
            t, h, w = piece
            ids += (
                [cfg.vision_start_token_id]
                + [cfg.image_token_id] * (t * h * w // 4)
                + [cfg.vision_end_token_id]
            )
    assert tok is not None
    return ids


def test_rope_index_many_grids(tiny, model):
    rng = np.random.default_rng(0)
    layouts = [
        [3, (1, 2, 2), 4],
        [5, (1, 4, 10), 2],
        [1, (1, 10, 4), 7, (1, 6, 6), 3],
        [2, (1, 2, 30), 1],
        [(1, 8, 2), 5],
        [4, (1, 14, 14), 0],
        [6, (1, 2, 2), (1, 4, 2), 6],  # two images back to back (separated by end/start tokens)
    ]
    for pad_to in (None, 160):
        rows = [_prompt_ids(tiny, rng, pieces) for pieces in layouts]
        length = pad_to or max(map(len, rows))
        pad = tiny.processor.tokenizer.pad_token_id
        ids = np.array([[pad] * (length - len(r)) + r for r in rows])
        mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        grids = np.array([p for pieces in layouts for p in pieces if not isinstance(p, int)])
        ours, next_pos = rope_index(ids, mask, grids, model.config)
        ref, deltas = tiny.hf.model.get_rope_index(
            torch.tensor(ids),
            mm_token_type_ids=torch.tensor((ids == tiny.config.image_token_id).astype(np.int64)),
            image_grid_thw=torch.tensor(grids),
            attention_mask=torch.tensor(mask),
        )
        np.testing.assert_array_equal(ours, ref.numpy())
        # decoding continues at max + 1 = (real length + delta), as transformers' rope_deltas
        np.testing.assert_array_equal(next_pos, mask.sum(1) + deltas.numpy()[:, 0])


def test_rope_index_rejects_mismatched_spans(tiny, model):
    rng = np.random.default_rng(1)
    ids = np.array([_prompt_ids(tiny, rng, [3, (1, 4, 4), 2])])
    with pytest.raises(ValueError, match="does not match its grid"):
        rope_index(ids, None, np.array([[1, 4, 6]]), model.config)
    with pytest.raises(ValueError, match="more image-token spans"):
        rope_index(ids, None, np.zeros((0, 3), np.int64), model.config)
    with pytest.raises(ValueError, match="more images"):
        rope_index(ids, None, np.array([[1, 4, 4], [1, 2, 2]]), model.config)


def _logits(model, batch):
    grid = batch["image_grid_thw"].numpy()
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    positions, _ = rope_index(ids, mask, grid, model.config)
    layout = vision_layout(grid, model.config.vision)
    graphdef, state = nnx.split(model)
    pixels = jnp.asarray(batch["pixel_values"].numpy())
    return np.asarray(
        _jit_logits(
            graphdef,
            state,
            jnp.asarray(ids),
            pixels,
            layout,
            jnp.asarray(positions),
            jnp.asarray(mask),
        )
    )


def _hf_logits(tiny, batch):
    with torch.no_grad():
        return tiny.hf(**batch).logits.numpy()


@pytest.mark.slow
def test_logits_two_images_and_left_padded_batch(tiny, model, parity_record):
    prompts = [("what is shown in this picture", 2), ("describe the image", 1), ("how many", 1)]
    images = [
        random_image(40, 56, 0),
        random_image(24, 32, 1),
        random_image(16, 48, 2),
        random_image(32, 32, 3),
    ]
    batch = hf_inputs(tiny.processor, prompts, images)
    mask = batch["attention_mask"].numpy().astype(bool)
    assert (~mask).any(), "the batch should be left-padded"
    ref = _hf_logits(tiny, batch)
    ours = _logits(model, batch)
    d = parity_record(
        "qwen logits (batch, 2 images)",
        "left-padded B=3",
        _maxdiff(ours[mask], ref[mask]),
        BOUND,
        scale=float(np.abs(ref).max()),
    )
    assert d <= BOUND
    # Each row of the padded batch equals that row run alone (by transformers).
    image_of_row = [[0, 1], [2], [3]]
    for r, (prompt, imgs) in enumerate(zip(prompts, image_of_row)):
        alone = _hf_logits(tiny, hf_inputs(tiny.processor, [prompt], [images[i] for i in imgs]))[0]
        n = alone.shape[0]
        assert mask[r, -n:].all() and not mask[r, : mask.shape[1] - n].any()
        assert _maxdiff(ours[r, -n:], alone) <= BOUND, r


@pytest.mark.slow
def test_long_prompt_logits(tiny, model, parity_record):
    """>= 512 tokens: RoPE bugs hide near position 0."""
    words = "the small red cat is sitting on a blue table and".split()
    text = " ".join(words[i % len(words)] for i in range(560))
    batch = hf_inputs(tiny.processor, [(text, 1)], [random_image(40, 24, 5)])
    assert batch["input_ids"].shape[1] >= 560
    d = parity_record(
        "qwen logits (long prompt)",
        f"L={batch['input_ids'].shape[1]}",
        _maxdiff(_logits(model, batch), _hf_logits(tiny, batch)),
        BOUND,
    )
    assert d <= BOUND


@pytest.mark.slow
def test_tied_head_logits(parity_record):
    tiny = tiny_model(tie_word_embeddings=True, seed=1)
    model = restore_model(converted(tiny))
    assert model.language_model.lm_head is None
    batch = hf_inputs(tiny.processor, [("what color is it", 1)], [random_image(24, 40, 7)])
    d = parity_record(
        "qwen logits (tied head)",
        "B=1",
        _maxdiff(_logits(model, batch), _hf_logits(tiny, batch)),
        BOUND,
    )
    assert d <= BOUND
