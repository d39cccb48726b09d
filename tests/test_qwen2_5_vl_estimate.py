"""zspa_jax.estimate for Qwen2.5-VL: image grids equal the Qwen2-VL image processor's,
parameter counts equal transformers' model, windows cover every patch once."""

from __future__ import annotations

import numpy as np
import pytest

from zspa_jax.families import read_config
from tests.qwen2_5_vl_helpers import converted, random_image, tiny_model
from zspa_jax import estimate as est


@pytest.mark.parametrize("hw", [(448, 448), (1344, 1008), (333, 200), (40, 3000), (20, 20)])
def test_grid_matches_image_processor(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = est.qwen2_5_vl_7b_config()
    processor = Qwen2VLImageProcessorPil()  # Qwen2.5-VL's defaults: patch 14, merge 2, 56^2..28^2*1280 pixels
    grid = processor(images=[random_image(*hw, seed=0)], return_tensors="np")["image_grid_thw"][0]
    assert tuple(grid) == (1, *est.qwen_image_grid(*hw, cfg.vision))


def test_448_and_1344x1008_token_counts():
    cfg = est.qwen2_5_vl_7b_config()
    small = est.estimate_qwen2_5_vl(cfg, 60, (448, 448), keep=64)
    large = est.estimate_qwen2_5_vl(cfg, 60, (1344, 1008), keep=64)
    assert small["visual_tokens"] == 256 and large["visual_tokens"] == 82 * 60 // 4
    assert small["sequence_length"] == large["sequence_length"] == 124  # fixed K: one LLM shape
    assert large["prefill_reduction"] > small["prefill_reduction"] > 1
    with pytest.raises(ValueError, match="keep must be in"):
        est.estimate_qwen2_5_vl(cfg, 60, (448, 448), keep=257)


def test_parameter_count_matches_transformers():
    tiny = tiny_model()
    cfg = read_config(converted(tiny))
    ours = est._numel_qwen_vision(cfg.vision) + est._numel_llm(cfg.text)
    hf = sum(p.numel() for p in {id(p): p for p in tiny.hf.parameters()}.values())
    assert ours == hf


@pytest.mark.parametrize("grid", [(32, 32), (82, 60), (6, 10), (2, 30)])
def test_windows_cover_every_patch_once(grid):
    from zspa_jax.families.qwen2_5_vl.layout import num_windows

    v = est.qwen2_5_vl_7b_config().vision
    sizes = est._qwen_window_sizes(*grid, v)
    assert sum(sizes) == grid[0] * grid[1] and max(sizes) <= est.qwen2_5_vl_7b_config().vision.window_merged**2 * 4
    assert len(sizes) == num_windows(np.array([[1, *grid]]), v)
