"""zspa_jax.estimate for Qwen2.5-VL: image grids equal the Qwen2-VL image processor's,
parameter counts equal transformers' model, windows cover every patch once."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.tiny_qwen2_5_vl import converted, random_image, tiny_model
from zspa_jax import estimate as est
from zspa_jax.families import read_config
from zspa_jax.pruning import PruneConfig


@pytest.mark.parametrize("hw", [(448, 448), (1344, 1008), (333, 200), (40, 3000), (20, 20)])
def test_grid_matches_image_processor(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = est.qwen2_5_vl_7b_config()
    processor = (
        Qwen2VLImageProcessorPil()
    )  # Qwen2.5-VL's defaults: patch 14, merge 2, 56^2..28^2*1280 pixels
    grid = processor(images=[random_image(*hw, seed=0)], return_tensors="np")["image_grid_thw"][0]
    assert tuple(grid) == (1, *est.qwen_image_grid(*hw, cfg.vision))


def test_448_and_1344x1008_token_counts():
    cfg = est.qwen2_5_vl_7b_config()
    small = est.estimate_qwen2_5_vl(cfg, 60, (448, 448), PruneConfig(keep=64))
    large = est.estimate_qwen2_5_vl(cfg, 60, (1344, 1008), PruneConfig(keep=64))
    assert small["visual_tokens"] == 256 and large["visual_tokens"] == 82 * 60 // 4
    assert small["sequence_length"] == large["sequence_length"] == 124  # fixed K: one LLM shape
    assert large["prefill_reduction"] > small["prefill_reduction"] > 1
    with pytest.raises(ValueError, match="keep must be in"):
        est.estimate_qwen2_5_vl(cfg, 60, (448, 448), PruneConfig(keep=257))


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
    assert (
        sum(sizes) == grid[0] * grid[1]
        and max(sizes) <= est.qwen2_5_vl_7b_config().vision.window_merged ** 2 * 4
    )
    assert len(sizes) == num_windows(np.array([[1, *grid]]), v)


def test_video_tokens_flops_and_cli():
    """A 16x448x448 clip: its grid equals zspa_jax's video processing with Qwen2-VL's video
    processor defaults (itself checked against transformers in test_qwen2_5_vl_video.py),
    the tower runs once per temporal patch, and K counts over the clip's tokens."""
    import contextlib
    import io
    import json

    from zspa_jax.estimate.cli import main
    from zspa_jax.families.qwen2_5_vl.video import VideoSettings, process_video

    cfg = est.qwen2_5_vl_7b_config()
    frames = np.zeros((16, 448, 448, 3), np.uint8)
    _, grid, _ = process_video(
        frames, VideoSettings()
    )  # transformers' Qwen2VLVideoProcessor class defaults
    assert grid.tolist() == [8, 32, 32] == list(est.qwen_video_grid(16, 448, 448, cfg.vision))
    clip = est.estimate_model(cfg, 60, None, PruneConfig(keep=256), video=(16, 448, 448), fps=2.0)
    image = est.estimate_model(cfg, 60, (448, 448), PruneConfig(keep=256))
    assert clip["visual_tokens"] == 8 * 256 and clip["kept_tokens"] == 256
    assert clip["vision_flops"] == 8 * image["vision_flops"]
    assert clip["llm_prefill_flops"] == image["llm_prefill_flops"]  # the same L' = T + K
    assert (
        clip["second_per_grid_ts"] == 1.0 and clip["temporal_position_span"] == 7 * 2
    )  # 2 tokens per second
    full = est.estimate_model(cfg, 60, video=(16, 448, 448))
    assert full["kv_cache_bytes"] == full["kv_cache_bytes_unpruned"] > clip["kv_cache_bytes"]
    with pytest.raises(ValueError, match="multiple of temporal_patch_size=2"):
        est.estimate_model(cfg, 60, video=(15, 448, 448))
    with pytest.raises(ValueError, match="takes no video"):
        est.estimate_model(est.llava_1_5_7b_config(), 60, video=(16, 448, 448))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(["--model", "qwen2.5-vl-7b", "--video", "16x448x448", "--fps", "2", "--json"]) == 0
        )
    rows = json.loads(out.getvalue())
    assert [r["kept_tokens"] for r in rows] == [2048, 512, 256, 128]
    assert (
        rows[2]["vision_flops"] == clip["vision_flops"]
        and rows[2]["kv_cache_bytes"] == clip["kv_cache_bytes"]
    )
    with pytest.raises(SystemExit):
        main(["--model", "qwen2.5-vl-7b", "--video", "16x448"])
