"""Qwen3-VL parity against transformers (f32, one tiny random model converted in process).

The tower (learned position table resampled to grids smaller and larger than it, 2-D
rotary, per-segment full attention, merger, every DeepStack level) for two images of
different grids and a two-temporal-patch video; the decoder's logits (QK-norm,
interleaved M-RoPE, DeepStack after layers 0, 1, 2) for a left-padded batch of two rows
with images of different sizes, positions from transformers' `get_rope_index`.

A grid larger than the position table is not an error in transformers (bilinear
resampling with align_corners stretches the table to any grid), so the tower is checked
on such a grid instead of for a refusal.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.qwen3_vl import convert
from models.checkpoint import read_payload, restore_model
from models.llama import DeepStackInput, mrope_rows
from models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, vision_layout
from tests.support.tiny_qwen2_5_vl import randomize_

BOUND = 1e-5
IMAGE, VIDEO, START, END, PAD = 120, 121, 122, 123, 0
SIDE = 4  # the position table is SIDE x SIDE
# (t, h, w) in patches: one grid inside the table, one larger than it on both axes.
IMAGE_GRIDS = [(1, 2, 4), (1, 6, 8)]
VIDEO_GRID = (2, 6, 4)


def _hf_config():
    from transformers import Qwen3VLConfig as HFConfig

    return HFConfig(
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=64,
            num_position_embeddings=SIDE * SIDE,
            deepstack_visual_indexes=[0, 1, 3],
        ),
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            pad_token_id=PAD,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, eager attention; our restored model), from one checkpoint."""
    from transformers import Qwen3VLForConditionalGeneration as HFModel

    root = tmp_path_factory.mktemp("qwen3_vl")
    torch.manual_seed(0)
    hf = HFModel(_hf_config())
    randomize_(hf, seed=0)
    hf = hf.to(torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(root / "hf")
    hf.set_attn_implementation("eager")
    convert(root / "hf", root / "out", progress=False)
    cfg = Qwen3VLConfig.from_dict(read_payload(Path(root / "out"))[1])
    return hf, restore_model(root / "out", cfg, Qwen3VLForConditionalGeneration)


def _pixels(grids, seed: int) -> torch.Tensor:
    rows = int(sum(np.prod(g) for g in grids))
    return torch.randn(rows, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(seed))


def _maxdiff(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


@functools.partial(jax.jit, static_argnums=(0,))
def _tower(graphdef, state, pixels, layout):
    return nnx.merge(graphdef, state).visual(pixels, layout)


def test_tower_and_deepstack_match_transformers(tiny):
    """Two images and a video in one tower call, on padded slots, against transformers'
    image and video features: every item attends only within its own segments."""
    hf, model = tiny
    cfg = model.config.vision
    images, video = _pixels(IMAGE_GRIDS, seed=1), _pixels([VIDEO_GRID], seed=2)
    with torch.no_grad():
        image_features = hf.get_image_features(images, torch.tensor(IMAGE_GRIDS))
        video_features = hf.get_video_features(video, torch.tensor([VIDEO_GRID]))
    ref_merged = torch.cat([*image_features.pooler_output, *video_features.pooler_output])
    ref_levels = [
        torch.cat([*i, *v])
        for i, v in zip(image_features.deepstack_features, video_features.deepstack_features)
    ]
    pixels = torch.cat([images, video])
    padding = 8  # merged tokens of padding slots after the real ones
    layout = vision_layout(
        np.asarray([*IMAGE_GRIDS, VIDEO_GRID]),
        cfg,
        slots=pixels.shape[0] + padding * cfg.merge_unit,
    )
    merged, levels = _tower(*nnx.split(model), jnp.asarray(pixels.numpy()), layout)
    tokens = ref_merged.shape[0]
    assert merged.shape == (tokens + padding, cfg.out_hidden_size)
    assert levels.shape[0] == len(ref_levels) == len(cfg.deepstack_visual_indexes) == 3
    assert _maxdiff(merged[:tokens], ref_merged) < BOUND
    for ours, ref in zip(levels, ref_levels):
        assert _maxdiff(ours[:tokens], ref) < BOUND


def test_layout_matches_transformers_position_table_taps():
    """The host-side taps and rotary positions are transformers' own, exactly."""
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    grids = torch.tensor([*IMAGE_GRIDS, VIDEO_GRID, (1, 2, 2), (1, 12, 2)])
    cfg = Qwen3VLConfig.from_dict(_config_dict()).vision
    layout = vision_layout(grids.numpy(), cfg)
    index, weight = get_vision_interpolation_indices_and_weights(
        grids, SIDE, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    np.testing.assert_array_equal(layout.table_index, index.numpy())
    np.testing.assert_array_equal(layout.table_weight, weight.numpy())
    np.testing.assert_array_equal(layout.positions, get_vision_position_ids(grids, 2).numpy())


def _config_dict() -> dict:
    from convert.qwen3_vl import qwen3_vl_config_from_hf

    return qwen3_vl_config_from_hf(_hf_config().to_dict()).to_dict()


def test_interleaved_mrope_rows_match_transformers():
    """Which of t/h/w each rotary frequency reads, for the real models' sections and the tiny one's."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    for section in ([24, 20, 20], [6, 5, 5]):
        rows = torch.arange(3, dtype=torch.float32)[:, None].expand(3, sum(section)).clone()
        rotary = Qwen3VLTextRotaryEmbedding.__new__(Qwen3VLTextRotaryEmbedding)
        rotary.mrope_section = section
        expected = rotary.recomposition_frequencies(rows)[: sum(section)]
        np.testing.assert_array_equal(
            mrope_rows(tuple(section), interleaved=True), expected.numpy()
        )


def _batch(hf):
    """Two left-padded rows, one image each (different grids), transformers' inputs."""
    merge = hf.config.vision_config.spatial_merge_size**2
    rows = []
    for (t, h, w), words in zip(IMAGE_GRIDS, ([5, 6, 7], [8, 9, 10, 11, 12, 13, 14])):
        ids = [1, 2, START] + [IMAGE] * (t * h * w // merge) + [END] + words
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    mm_token_type_ids = (input_ids == IMAGE).to(torch.int32)
    grid = torch.tensor(IMAGE_GRIDS)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        pixel_values=_pixels(IMAGE_GRIDS, seed=7),
        image_grid_thw=grid,
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(graphdef, state, ids, pixels, layout, positions, mask, slots, slot_feature):
    """(The model's forward, DeepStack by mask; the decoder fed by hand with DeepStack in
    index form: slots int [B, N], the sequence position of each row's visual tokens, -1
    padding; slot_feature int [B, N], their merged-token index)."""
    model = nnx.merge(graphdef, state)
    forward = model(ids, pixels, layout, positions, mask)
    merged, levels = model.image_features(pixels, layout)
    visual = slots >= 0
    embeds = model.embed_tokens(ids)
    rows = jnp.arange(ids.shape[0])[:, None]
    index = jnp.where(visual, slots, ids.shape[1])
    embeds = embeds.at[rows, index].set(merged[slot_feature], mode="drop")
    deepstack = [
        DeepStackInput(i, jnp.where(visual[..., None], levels[i][slot_feature], 0.0), slots)
        for i in range(levels.shape[0])
    ]
    lm = model.language_model
    causal = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))[None] & mask.astype(bool)[:, None]
    hidden, _ = lm.model(embeds, positions, causal, deepstack=deepstack)
    return forward, lm.logits(hidden)


def test_logits_match_transformers_left_padded(tiny):
    hf, model = tiny
    batch = _batch(hf)
    with torch.no_grad():
        ref = hf(**batch).logits.numpy()
        positions, _ = hf.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
    cfg = model.config
    layout = vision_layout(batch["image_grid_thw"].numpy(), cfg.vision)
    args = (
        jnp.asarray(batch["input_ids"].numpy()),
        jnp.asarray(batch["pixel_values"].numpy()),
        layout,
        jnp.asarray(positions.numpy()),
        jnp.asarray(batch["attention_mask"].numpy()),
    )
    # DeepStack as indices too (what a pruned sequence would pass)
    visual = batch["input_ids"].numpy() == IMAGE
    n = int(visual.sum(1).max())
    slots = np.full((2, n), -1, np.int32)
    slot_feature = np.zeros((2, n), np.int32)
    offset = 0
    for b in range(2):
        where = np.flatnonzero(visual[b])
        slots[b, : where.size] = where
        slot_feature[b, : where.size] = offset + np.arange(where.size)
        offset += where.size
    by_mask, by_index = _logits(*nnx.split(model), *args, slots, slot_feature)
    valid = batch["attention_mask"].numpy().astype(bool)
    assert np.isfinite(np.asarray(by_mask)).all()
    assert _maxdiff(np.asarray(by_mask)[valid], ref[valid]) < BOUND
    assert _maxdiff(np.asarray(by_index)[valid], ref[valid]) < BOUND
