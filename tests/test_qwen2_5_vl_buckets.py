"""Qwen2.5-VL's tower buckets: padding proportional to the image, a bounded set of programs.

The tower runs on the real patches packed densely plus padding slots up to `slot_bucket`
(a ladder of rungs <= 10% apart from 256 patches). Checked here: the padding is <= 10% of
the real patches for every image from 224 x 224 to 1792 x 1792 under the default Qwen2-VL
image processor (one image, several images, a clip), the number of distinct tower shapes
for all images up to 1344 x 1344 (what the README states; a power-of-two bucket has too
few rungs to pad by <= 10% and fails), and that jit compiles one tower per bucket.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from models.llama import LlamaConfig
from models.qwen2_5_vl import Qwen2_5_VisionTransformer, Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from zspa_jax.families.qwen2_5_vl import layout
from zspa_jax.families.qwen2_5_vl.layout import (
    SLOT_RATIO,
    num_patches,
    prepare_batch,
    slot_bucket,
    vision_layout,
)

# The Qwen2.5-VL 3B / 7B tower's patch geometry (patch 14, merge 2, window 112).
REAL = Qwen2_5_VLVisionConfig()
SIZES = range(224, 1792 + 1, 28)
DOCUMENTED_PROGRAMS = 44  # README, Qwen2.5-VL: tower programs for all images up to 1344 x 1344


def _default_resize():
    """transformers' Qwen2-VL image processor defaults: (factor, min_pixels, max_pixels) and its smart_resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
        smart_resize,
    )

    proc = Qwen2VLImageProcessorPil()
    factor = proc.patch_size * proc.merge_size
    assert (proc.patch_size, proc.merge_size) == (REAL.patch_size, REAL.spatial_merge_size)
    return lambda h, w: smart_resize(
        h,
        w,
        factor=factor,
        min_pixels=proc.size["shortest_edge"],
        max_pixels=proc.size["longest_edge"],
    )


def _grid(resize, h: int, w: int) -> tuple[int, int, int]:
    rh, rw = resize(h, w)
    return 1, rh // REAL.patch_size, rw // REAL.patch_size


def _qwen_config(vision: Qwen2_5_VLVisionConfig) -> Qwen2_5_VLConfig:
    heads = vision.out_hidden_size // 16  # head_dim 16: M-RoPE sections (2, 3, 3)
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=vision.out_hidden_size,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        mrope_section=(2, 3, 3),
    )
    return Qwen2_5_VLConfig(
        vision=vision,
        text=text,
        image_token_id=60,
        video_token_id=61,
        vision_start_token_id=62,
        vision_end_token_id=63,
    )


def _bucketed_layout(cfg: Qwen2_5_VLConfig, grids: list[tuple[int, int, int]], video: bool = False):
    """The tower layout generate uses (prepare_batch, bucket=True) for one prompt holding `grids`."""
    unit = cfg.vision.merge_unit
    token = cfg.video_token_id if video else cfg.image_token_id
    ids = [1, 2]
    for t, h, w in grids:
        ids += (
            [cfg.vision_start_token_id] + [token] * (t * h * w // unit) + [cfg.vision_end_token_id]
        )
    ids = np.asarray([ids + [3]])
    grid = np.asarray(grids, np.int64)
    pixels = np.zeros((num_patches(grid), cfg.vision.patch_dim), np.float32)
    kw = dict(pixel_values_videos=pixels, video_grid_thw=grid) if video else {}
    batch = prepare_batch(
        cfg, ids, None, None if video else pixels, None if video else grid, bucket=True, **kw
    )
    return batch.aux.layout


def test_tower_padding_is_at_most_ten_percent_of_the_real_patches():
    """Every image from 224 x 224 to 1792 x 1792 (step 28, both orientations) under the
    default resize: the slots generate lays out hold every real patch and at most 10% more."""
    resize = _default_resize()
    grids = {_grid(resize, h, w) for h in SIZES for w in SIZES}
    assert len(grids) > 300
    worst = 0.0
    for t, gh, gw in grids:
        real = t * gh * gw
        slots = slot_bucket(real, REAL)
        assert real <= slots <= real * SLOT_RATIO and slots % REAL.merge_unit == 0, (
            (gh, gw),
            slots,
        )
        worst = max(worst, slots / real - 1)
    assert (
        worst > 0.05
    )  # the bound is met with little to spare somewhere (the ladder is not finer than it needs)
    # what generate's host path lays out, on a sample (both orientations, the largest, the smallest)
    cfg = _qwen_config(REAL)
    for h, w in [
        (224, 224),
        (224, 1792),
        (1792, 224),
        (1008, 1344),
        (1344, 1008),
        (672, 896),
        (1792, 1792),
        (476, 700),
        (700, 476),
    ]:
        grid = _grid(resize, h, w)
        lay = _bucketed_layout(cfg, [grid])
        real = int(lay.valid.sum())
        assert (
            real == math.prod(grid)
            and lay.order.size == slot_bucket(real, REAL) <= real * SLOT_RATIO
        )
        assert lay.valid[:real].all()  # real patches first, packed: no padding inside windows
        # full attention reads at most every slot, windowed attention a window's neighbourhood
        assert lay.key_offsets.size <= lay.order.size + lay.chunk_keys.size
        assert lay.window_offsets.size <= 3 * layout.window_slots(REAL)


def test_several_images_and_a_clip_pad_the_tower_by_at_most_ten_percent():
    resize = _default_resize()
    cfg = _qwen_config(REAL)
    for sizes in ([(224, 224), (448, 336)], [(1344, 1008), (300, 500), (224, 1792)]):
        grids = [_grid(resize, h, w) for h, w in sizes]
        lay = _bucketed_layout(cfg, grids)
        real = sum(math.prod(g) for g in grids)
        assert int(lay.valid.sum()) == real and real <= lay.order.size <= real * SLOT_RATIO, (
            sizes,
            lay.order.size,
        )
    # a clip of 8 temporal patches (a full temporal bucket) of 448 x 448 frames
    lay = _bucketed_layout(cfg, [(8, 32, 32)], video=True)
    assert 8 * 32 * 32 <= lay.order.size <= 8 * 32 * 32 * SLOT_RATIO


def test_tower_programs_up_to_1344_are_few_and_documented():
    """The distinct tower shapes (layout array shapes, which fix the compiled program) for
    all images up to 1344 x 1344 under the default resize: the README's number. A bucket
    with rungs more than 10% apart (e.g. powers of two) cannot pad every size by <= 10%: it
    has fewer rungs than log(largest / smallest) / log(1.1)."""
    resize = _default_resize()
    edges = range(28, 1344 + 1, 14)
    grids = {_grid(resize, h, w) for h in edges for w in edges}
    shapes = {}
    for grid in grids:
        slots = slot_bucket(math.prod(grid), REAL)
        shapes.setdefault(slots, grid)
    signatures = set()
    cfg = _qwen_config(REAL)
    for grid in shapes.values():
        lay = _bucketed_layout(cfg, [grid])
        signatures.add(tuple(np.shape(a) for a in lay))
    assert len(signatures) == len(shapes) == DOCUMENTED_PROGRAMS, len(signatures)
    real = sorted(math.prod(g) for g in grids)
    ladder_from = 4 * layout.SLOT_LADDER_START  # patches: <= 10% padding from here on
    needed = math.ceil(math.log(real[-1] / ladder_from) / math.log(SLOT_RATIO))
    assert len([s for s in shapes if s > ladder_from]) >= needed


def test_one_compiled_tower_per_bucket():
    """jit compiles the tower once per slot bucket: grids of different sizes in one bucket
    share a program (counted with the jitted function's cache)."""
    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=4,
        window_size=16,
        fullatt_block_indexes=(1,),
        out_hidden_size=16,
    )
    tower = Qwen2_5_VisionTransformer(vision, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(tower)

    @jax.jit
    def run(state, pixels, lay):
        return nnx.merge(graphdef, state)(pixels, lay)

    cfg = _qwen_config(vision)
    grids = [
        (1, 18, 18),
        (1, 16, 20),
        (1, 20, 16),
        (1, 20, 20),
        (1, 18, 22),
        (1, 24, 24),
        (1, 22, 26),
        (1, 40, 40),
        (1, 38, 42),
    ]
    buckets = {slot_bucket(math.prod(g), vision) for g in grids}
    assert 1 < len(buckets) < len(grids)
    for grid in grids:
        lay = _bucketed_layout(cfg, [grid])
        pixels = (
            np.random.default_rng(0)
            .standard_normal((lay.order.size, vision.patch_dim))
            .astype(np.float32)
        )
        out = run(state, pixels, lay)
        assert out.shape[0] == lay.order.size // vision.merge_unit
        assert np.isfinite(np.asarray(out)).all()
    assert run._cache_size() == len(buckets)


def test_the_slot_ladder():
    """Powers of two up to 64 merged tokens, then rungs at most SLOT_RATIO apart that grow
    (and whose large rungs split into many-slot chunks)."""
    rungs = sorted({layout.token_bucket(n) for n in range(1, 2000)})
    small = [r for r in rungs if r <= layout.SLOT_LADDER_START]
    assert small == [1 << i for i in range(len(small))]
    big = [r for r in rungs if r >= layout.SLOT_LADDER_START]
    assert all(b / a <= SLOT_RATIO for a, b in zip(big, big[1:]))
    assert all(r % 16 == 0 for r in big if r >= 512)
    for n in range(1, 2000):
        assert n <= layout.token_bucket(n)
    with pytest.raises(ValueError, match="slots"):
        vision_layout(np.array([[1, 4, 4]]), REAL, slots=12)
