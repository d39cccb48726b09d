"""Qwen2.5-VL video against transformers (f32, tiny random checkpoints converted by the CLI).

Frames -> arrays: zspa_jax's numpy video processing equals a torch reference written from
transformers' Qwen2VLVideoProcessor code (its own class needs torchvision, which the
install removes), and the string path equals transformers' tokenizer, chat template and
image processor around it. The tower's window layout and the 3-D
M-RoPE positions for clips (temporal positions scaled by tokens_per_second x
second_per_grid_ts) equal transformers'. Logits unpruned (a clip, a row with an image and a
video, a left-padded batch of two clips of different lengths) and pruned (transformers fed
the kept tokens' embeddings at their original 3-D positions), kept indices against the eager
torch references, greedy tokens, FastV/DART on a clip, one compiled program across clip
lengths of one temporal bucket, and bad input refused by name before anything compiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zspa_jax
from tests.support.tiny_qwen2_5_vl import (
    MERGE,
    converted,
    hf_greedy_from_pruned,
    random_image,
    tiny_model,
    video_processor_config,
)
from tests.support.tiny_qwen2_5_vl import random_clip as clip
from tests.support.torch_reference_pruning import cdpruner_reference, select_tokens_reference
from zspa_jax import Video, generation
from zspa_jax.families.qwen2_5_vl.layout import rope_index, temporal_bucket, vision_layout
from zspa_jax.families.qwen2_5_vl.resize import resize_bicubic_uint8
from zspa_jax.families.qwen2_5_vl.video import VideoSettings, process_video

BOUND = (
    1e-4  # as the existing Qwen2.5-VL parity tests (tests/test_qwen2_5_vl_parity.py, _generate.py)
)
LOGITS = 1e-5  # video logits, unpruned and pruned (measured <= 4.0e-6 at logits of ~6)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def vlm(tiny):
    return zspa_jax.load(converted(tiny))


def mm_token_type_ids(tiny, ids: np.ndarray) -> np.ndarray:
    cfg = tiny.config
    return np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0)).astype(
        np.int64
    )


def torch_batch(tiny, a: dict) -> dict:
    """zspa_jax.encode's arrays as transformers' model inputs (with mm_token_type_ids)."""
    out = {k: torch.as_tensor(np.asarray(v)) for k, v in a.items()}
    out["input_ids"] = out["input_ids"].long()
    out["attention_mask"] = out["attention_mask"].long()
    out["mm_token_type_ids"] = torch.as_tensor(mm_token_type_ids(tiny, a["input_ids"]))
    return out


def hf_logits(tiny, a: dict) -> np.ndarray:
    with torch.no_grad():
        return tiny.hf(**torch_batch(tiny, a)).logits.numpy()


# ----------------------------------------------------------------------------- frames -> arrays


@pytest.mark.parametrize("seed", range(3))
def test_resize_equals_torchs_uint8_bicubic_antialias(seed):
    """The numpy resize equals torch's `interpolate(uint8, mode="bicubic", antialias=True)`
    (what torchvision's resize runs for the video processor) bit for bit, shrinking and
    growing each axis, including the sizes where PIL's bicubic differs from it."""
    rng = np.random.default_rng(seed)
    sizes = [(33, 47, 32, 48), (40, 56, 48, 64), (480, 640, 224, 308), (7, 9, 28, 28)]
    sizes += [tuple(int(v) for v in rng.integers(4, 200, 4)) for _ in range(12)]
    differs_from_pil = 0
    from PIL import Image

    for h, w, oh, ow in sizes:
        x = rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(oh, ow), mode="bicubic", antialias=True, align_corners=False
        ).numpy()
        np.testing.assert_array_equal(
            resize_bicubic_uint8(x, oh, ow), ref, err_msg=str((h, w, oh, ow))
        )
        pil = np.asarray(
            Image.fromarray(x[0].transpose(1, 2, 0)).resize((ow, oh), Image.BICUBIC)
        ).transpose(2, 0, 1)
        differs_from_pil += not np.array_equal(pil, ref[0])
    assert differs_from_pil > 0  # why the video frames are not resized with PIL


def _reference_video_processor(frames, cfg: dict, metadata=None, num_frames=None, fps=None):
    """transformers' Qwen2VLVideoProcessor (5.24: sample_frames, resize, _preprocess,
    patchify) and Qwen2_5_VLProcessor's second_per_grid_ts, re-typed step by step in torch
    without torchvision (its resize is `interpolate(uint8, bicubic, antialias=True)`)."""
    import math

    video = torch.from_numpy(
        np.stack([np.asarray(f) for f in frames]) if isinstance(frames, list) else frames
    )
    video = video.permute(0, 3, 1, 2).contiguous()  # _prepare_input_videos: channels last -> first
    total = video.shape[0]
    tps, patch, merge = cfg["temporal_patch_size"], cfg["patch_size"], cfg["merge_size"]
    indices = None
    if num_frames is not None or fps is not None:  # sample_frames
        if num_frames is not None:
            num_frames = round(num_frames / tps) * tps
        else:
            max_frames = math.floor(min(cfg["max_frames"], total) / tps) * tps
            num_frames = total / metadata["fps"] * fps
            num_frames = min(max(num_frames, cfg["min_frames"]), max_frames, total)
            num_frames = math.floor(num_frames / tps) * tps
        indices = torch.arange(0, total, total / num_frames).int()
        video = video[indices]
    factor = patch * merge
    height, width = video.shape[-2:]
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor  # smart_resize
    lo, hi = cfg["size"]["shortest_edge"], cfg["size"]["longest_edge"]
    if h_bar * w_bar > hi:
        beta = math.sqrt((height * width) / hi)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < lo:
        beta = math.sqrt(lo / (height * width))
        h_bar, w_bar = (
            math.ceil(height * beta / factor) * factor,
            math.ceil(width * beta / factor) * factor,
        )
    if (h_bar, w_bar) != (height, width):
        video = torch.nn.functional.interpolate(
            video, size=[h_bar, w_bar], mode="bicubic", align_corners=False, antialias=True
        )
    mean = torch.tensor(cfg["image_mean"]) * (
        1.0 / cfg["rescale_factor"]
    )  # fused rescale + normalize
    std = torch.tensor(cfg["image_std"]) * (1.0 / cfg["rescale_factor"])
    video = video.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])[None]
    b, t, c, rh, rw = video.shape
    gt, gh, gw = t // tps, rh // patch, rw // patch
    patches = video.view(b, gt, tps, c, gh // merge, merge, patch, gw // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(
        b, gt * gh * gw, c * tps * patch * patch
    )
    src_fps = None if metadata is None else metadata.get("fps")
    sampled_fps = (
        (src_fps or 24) if indices is None or src_fps is None else len(indices) / total * src_fps
    )
    second = torch.tensor([tps / sampled_fps])  # BatchFeature -> float32
    return patches[0].numpy(), np.array([gt, gh, gw]), second.numpy()[0]


@pytest.mark.parametrize(
    "shape, options",
    [
        ((4, 40, 56), {}),  # kept size
        ((6, 33, 47), {"fps": 3.0}),  # resized (PIL would differ here)
        ((2, 100, 70), {}),  # shrunk to the max pixels
        ((4, 200, 30), {"fps": 25.0}),
        ((10, 24, 40), {"fps": 5.0, "num_frames": 4}),  # sampled: 4 of 10 frames
        ((30, 24, 24), {"fps": 10.0, "sample_fps": 2.0}),  # sampled at 2 fps: 6 frames
        ((9, 16, 16), {"fps": 3.0, "sample_fps": 1.0}),  # min_frames 4 of 9
        ((6, 40, 56), {"pil": True}),
    ],
)
def test_frames_equal_a_reference_of_transformers_video_processor(shape, options):
    cfg = video_processor_config()
    settings = VideoSettings.from_dict(cfg)
    frames = clip(*shape, seed=sum(shape))
    if options.get("pil"):
        from PIL import Image

        frames = [Image.fromarray(f) for f in frames]
    video = Video(
        frames,
        fps=options.get("fps"),
        num_frames=options.get("num_frames"),
        sample_fps=options.get("sample_fps"),
    )
    pixels, grid, second = process_video(video, settings)
    ref_pixels, ref_grid, ref_second = _reference_video_processor(
        frames,
        cfg,
        metadata={"fps": options.get("fps")},
        num_frames=options.get("num_frames"),
        fps=options.get("sample_fps"),
    )
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(pixels, ref_pixels)
    assert second.dtype == np.float32 and second == ref_second


def test_strings_images_and_frames_equal_transformers_pieces(tiny, vlm):
    """zspa_jax.encode with an image and a clip equals what transformers' Qwen2_5_VLProcessor
    builds from its pieces: the chat template and tokenizer, each <|video_pad|> expanded to the
    clip's t*h*w / merge^2 tokens, the image processor's arrays, and the video arrays of the
    torch re-typing of its Qwen2VLVideoProcessor (`_reference_video_processor`), with and
    without sampling and frame rates."""
    from PIL import Image

    tok = tiny.processor.tokenizer
    cfg = video_processor_config()
    frames = [Image.fromarray(f) for f in clip(10, 40, 56, seed=3)]
    image = random_image(24, 32, seed=4)
    text = tok.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "video"},
                    {"type": "text", "text": "what is shown"},
                ],
            }
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    pix = vlm.processor.image_processor(images=[image], return_tensors="np")
    image_tokens = int(np.prod(pix["image_grid_thw"][0])) // MERGE**2
    cases = [
        (Video(frames[:8]), dict(frames=frames[:8])),
        (Video(frames[:8], fps=3.0), dict(frames=frames[:8], metadata={"fps": 3.0})),
        (
            Video(frames, fps=5.0, num_frames=4),
            dict(frames=frames, metadata={"fps": 5.0}, num_frames=4),
        ),
        (
            Video(frames, fps=5.0, sample_fps=2.0),
            dict(frames=frames, metadata={"fps": 5.0}, fps=2.0),
        ),
    ]
    for video, ref_kw in cases:
        ref_pixels, ref_grid, ref_second = _reference_video_processor(
            ref_kw.pop("frames"), cfg, **ref_kw
        )
        video_tokens = int(np.prod(ref_grid)) // MERGE**2
        expanded = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens).replace(
            "<|video_pad|>", "<|video_pad|>" * video_tokens
        )
        ours = zspa_jax.encode(vlm, ["what is shown"], [image], videos=[video])
        np.testing.assert_array_equal(
            ours["input_ids"][0], tok(expanded)["input_ids"], err_msg=str(ref_kw)
        )
        np.testing.assert_array_equal(ours["pixel_values"], pix["pixel_values"])
        np.testing.assert_array_equal(ours["image_grid_thw"], pix["image_grid_thw"])
        np.testing.assert_array_equal(ours["pixel_values_videos"], ref_pixels, err_msg=str(ref_kw))
        np.testing.assert_array_equal(
            ours["video_grid_thw"][0], np.asarray(ref_grid).reshape(-1), err_msg=str(ref_kw)
        )
        np.testing.assert_array_equal(
            ours["second_per_grid_ts"], np.atleast_1d(ref_second), err_msg=str(ref_kw)
        )


# ----------------------------------------------------------------------------- layout and positions


def test_window_layout_for_clips_matches_transformers(vlm):
    """Window order, windowed-attention segments, full-attention segments (one per temporal
    patch) and the tower's 2-D rotary positions equal transformers' vision_utils for clips
    (t > 1) mixed with images."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    from models.qwen2_5_vl import window_slots

    cfg = vlm.config.vision
    for grid in ([[3, 10, 14]], [[1, 6, 8], [4, 4, 4], [2, 2, 18]], [[5, 8, 8]], [[8, 8, 8]]):
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
        # full attention: tokens of one segment are exactly one cu_seqlens range (in input order)
        full = get_vision_cu_seqlens(g).numpy()
        segment_of_input = np.empty(real.size, np.int64)
        segment_of_input[real] = layout.image_segment[layout.valid]
        expect = np.repeat(np.arange(len(full) - 1), np.diff(full))
        np.testing.assert_array_equal(segment_of_input, expect)
        positions = np.empty((real.size, 2), np.int64)
        positions[real] = layout.positions[layout.valid]
        np.testing.assert_array_equal(
            positions, get_vision_position_ids(g, cfg.spatial_merge_size).numpy()
        )
        # full attention reads each query chunk's key range: it holds every key of the chunk's segments
        seg = layout.image_segment
        span, chunks = layout.key_offsets.size, layout.chunk_keys.size
        chunk = seg.size // chunks
        # a chunk reads its own slots and at most two segments' worth more, so a long clip's
        # chunks read fewer keys than all slots (8 temporal patches of 64: 382 of 512)
        assert span <= -(-seg.size // chunks) + 2 * (int(np.diff(full).max()) - 1)
        assert span < seg.size or len(full) - 1 < 8
        for c, start in enumerate(layout.chunk_keys.tolist()):
            assert 0 <= start and start + span <= seg.size
            needed = np.isin(seg, seg[c * chunk : (c + 1) * chunk]) & (seg >= 0)
            assert not needed[:start].any() and not needed[start + span :].any(), (grid, c)


def _ids(tiny, rng, pieces) -> list[int]:
    """pieces: ints (random words), ("image", t, h, w) or ("video", t, h, w) spans."""
    cfg = tiny.config
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += list(rng.integers(1, 30, size=piece))
        else:
            kind, t, h, w = piece
            token = cfg.image_token_id if kind == "image" else cfg.video_token_id
            ids += (
                [cfg.vision_start_token_id] + [token] * (t * h * w // 4) + [cfg.vision_end_token_id]
            )
    return ids


@pytest.mark.parametrize("tokens_per_second", [4, 2])
def test_rope_index_for_videos_matches_transformers(tiny, vlm, tokens_per_second):
    """3-D positions and the next position (max + 1) equal transformers' get_rope_index for
    clips with and without second_per_grid_ts (float32 seconds whose products truncate, ints),
    images and clips in one row, clips whose temporal positions run past the text after them,
    and left padding."""
    import dataclasses

    cfg = dataclasses.replace(
        vlm.config,
        vision=dataclasses.replace(vlm.config.vision, tokens_per_second=tokens_per_second),
    )
    hf_vision = tiny.hf.model.config.vision_config
    saved = hf_vision.tokens_per_second
    rng = np.random.default_rng(tokens_per_second)
    layouts = [
        [3, ("video", 5, 4, 4), 4],
        [2, ("image", 1, 4, 6), 3, ("video", 3, 2, 8), 2],
        [("video", 7, 2, 2), 5, ("video", 2, 6, 4), 1],
        [4, ("video", 1, 4, 4), 6],
    ]
    rows = [_ids(tiny, rng, pieces) for pieces in layouts]
    length = max(map(len, rows)) + 3
    pad = tiny.processor.tokenizer.pad_token_id
    ids = np.array([[pad] * (length - len(r)) + r for r in rows])
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    grids = {
        kind: np.array(
            [p[1:] for pieces in layouts for p in pieces if not isinstance(p, int) and p[0] == kind]
        )
        for kind in ("image", "video")
    }
    n_videos = len(grids["video"])
    seconds_cases = [
        None,
        np.array([2 / 24, 2 / 30, 0.7, 1 / 3, 0.5][:n_videos], np.float32),
        np.array([1, 2, 3, 1, 1][:n_videos]),
    ]
    try:
        hf_vision.tokens_per_second = tokens_per_second
        for seconds in seconds_cases:
            ours, next_pos = rope_index(ids, mask, grids["image"], cfg, grids["video"], seconds)
            if seconds is None:  # row 0's clip: its temporal positions run past the text after it
                last = np.flatnonzero(ids[0] == tiny.config.video_token_id).max()
                assert ours[0, 0, last] > ours[:, 0, last + 1].max()
            ref, deltas = tiny.hf.model.get_rope_index(
                torch.tensor(ids),
                mm_token_type_ids=torch.tensor(mm_token_type_ids(tiny, ids)),
                image_grid_thw=torch.tensor(grids["image"]),
                video_grid_thw=torch.tensor(grids["video"]),
                second_per_grid_ts=None if seconds is None else torch.tensor(seconds),
                attention_mask=torch.tensor(mask),
            )
            np.testing.assert_array_equal(ours, ref.numpy(), err_msg=str(seconds))
            np.testing.assert_array_equal(next_pos, mask.sum(1) + deltas.numpy()[:, 0])
    finally:
        hf_vision.tokens_per_second = saved


# ----------------------------------------------------------------------------- bad input


def _clip_arrays(vlm, frames=4, size=(24, 32), seed=0, **kwargs):
    return zspa_jax.encode(
        vlm, ["what is this"], videos=[Video(clip(frames, *size, seed=seed), **kwargs)]
    )


def _two_clips(vlm):
    return zspa_jax.encode(
        vlm, ["compare these"], videos=[[clip(4, 24, 32, seed=1), clip(2, 40, 56, seed=2)]]
    )


BAD_ARRAYS = {  # case -> (edit(arrays, config), message)
    "grid_vs_pixels": (
        lambda a, c: a.update(video_grid_thw=np.array([[2, 6, 10]])),
        r"pixel_values_videos holds 96 patch rows but video_grid_thw \[\[2, 6, 10\]\]",
    ),
    "grid_missing": (
        lambda a, c: a.pop("video_grid_thw"),
        "video_grid_thw is required with pixel_values_videos",
    ),
    "pixels_missing": (
        lambda a, c: a.pop("pixel_values_videos"),
        "video_grid_thw was given without pixel_values_videos",
    ),
    "tokens_missing": (
        lambda a, c: a["input_ids"].__setitem__(a["input_ids"] == c.video_token_id, 5),
        r"input_ids holds 0 video tokens \(id \d+\) but video_grid_thw gives \[24\]",
    ),
    "tokens_without_video": (
        lambda a, c: [
            a.pop(k) for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        ],
        r"input_ids holds video tokens \(id \d+\) but pixel_values_videos is None",
    ),
    "seconds_length": (
        lambda a, c: a.update(second_per_grid_ts=np.array([1.0, 2.0], np.float32)),
        r"second_per_grid_ts must hold one entry per video of video_grid_thw \(1\)",
    ),
    "seconds_nan": (
        lambda a, c: a.update(second_per_grid_ts=np.array([np.nan], np.float32)),
        "second_per_grid_ts must be finite",
    ),
    "pixels_nan": (
        lambda a, c: a["pixel_values_videos"].__setitem__((3, 5), np.nan),
        "pixel_values_videos patch row 3 holds NaN",
    ),
    "grid_too_small": (
        lambda a, c: a.update(video_grid_thw=np.array([[2, 1, 48]])),
        r"video_grid_thw\[0\] = \(2, 1, 48\): .* too small",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_video_arrays_are_refused_before_compile(vlm, case):
    edit, needle = BAD_ARRAYS[case]
    a = _clip_arrays(vlm)
    edit(a, vlm.config)
    before = dict(generation.TRACE_COUNTS)
    with pytest.raises(ValueError, match=needle):
        zspa_jax.generate(vlm, max_new_tokens=2, **a)
    with pytest.raises(ValueError, match=needle):
        zspa_jax.forward(vlm, **a)
    assert dict(generation.TRACE_COUNTS) == before


def test_video_span_that_does_not_match_its_grid(vlm):
    """Two clips whose grids (and patches) are swapped: the token total matches, each span
    does not; the error names video_grid_thw."""
    a = _two_clips(vlm)
    grid = a["video_grid_thw"][::-1].copy()
    first = int(np.prod(grid[0]))
    a.update(
        video_grid_thw=grid,
        pixel_values_videos=np.concatenate(
            [a["pixel_values_videos"][-first:], a["pixel_values_videos"][:-first]]
        ),
    )
    with pytest.raises(
        ValueError,
        match=r"a video-token span of 24 tokens does not match its grid \(1, 10, 14\) in "
        r"video_grid_thw, which gives 35 tokens",
    ):
        zspa_jax.forward(vlm, **a)


def test_bad_frames_are_refused_by_name(vlm):
    from PIL import Image

    frames = [Image.fromarray(f) for f in clip(4, 24, 32, seed=0)]
    frames[2] = frames[2].resize((40, 24))
    with pytest.raises(
        ValueError,
        match=r"videos\[0\]: all frames of a video must have one size; frame 0 is 24x32 and "
        r"frame 2 is 24x40",
    ):
        zspa_jax.generate(vlm, ["what is this"], videos=[frames], max_new_tokens=2)
    with pytest.raises(
        ValueError, match=r"videos\[0\] has 5 frames, not a multiple of temporal_patch_size=2"
    ):
        zspa_jax.encode(vlm, ["what is this"], videos=[clip(5, 24, 32, seed=0)])
    with pytest.raises(ValueError, match=r"videos\[1\]\[0\] has 3 frames"):
        zspa_jax.encode(vlm, ["a", "b"], videos=[None, [clip(3, 24, 32, seed=0)]])
    with pytest.raises(TypeError, match=r"videos\[0\] must hold uint8 pixels"):
        zspa_jax.encode(vlm, ["what is this"], videos=[clip(4, 24, 32, seed=0).astype(np.float32)])
    with pytest.raises(ValueError, match=r"got 2 prompt\(s\) but 1 videos entries"):
        zspa_jax.encode(vlm, ["a", "b"], videos=[[clip(4, 24, 32, seed=0)]])
    with pytest.raises(ValueError, match="Video.sample_fps needs Video.fps"):
        Video(frames, sample_fps=2.0)
    with pytest.raises(
        ValueError, match=r"videos go with prompts; with input_ids, pass pixel_values_videos"
    ):
        zspa_jax.generate(vlm, input_ids=np.ones((1, 4), np.int32), videos=[frames])


def test_pool_on_a_clip_is_refused_by_name(vlm):
    a = _clip_arrays(vlm)
    before = dict(generation.TRACE_COUNTS)
    with pytest.raises(
        ValueError,
        match=r"method 'pool' pools one image's 2-D token grid; a video of more than one "
        r"temporal patch \(video_grid_thw t > 1\) has a 3-D grid",
    ):
        zspa_jax.generate(
            vlm, max_new_tokens=2, prune=zspa_jax.PruneConfig(keep=4, method="pool"), **a
        )
    for method in ("vispruner", "visionzip"):  # refused for video-only input too (no pixel_values)
        with pytest.raises(ValueError, match=r"has no \[CLS\] token"):
            zspa_jax.forward(vlm, prune=zspa_jax.PruneConfig(keep=4, method=method), **a)
    assert dict(generation.TRACE_COUNTS) == before


def test_llava_refuses_videos_by_name():
    from pathlib import Path

    demo = zspa_jax.load(Path(zspa_jax.__file__).parent / "assets" / "demo_model")
    frames = clip(2, 16, 16, seed=0)
    with pytest.raises(ValueError, match="video input is not supported by LLaVA models"):
        zspa_jax.generate(demo, ["what is this"], videos=[frames], max_new_tokens=2)
    with pytest.raises(ValueError, match="video input is not supported by LLaVA models"):
        zspa_jax.encode(demo, ["what is this"], videos=[frames])
    from zspa_jax.families import family_of

    with pytest.raises(ValueError, match="video input is not supported by LLaVA models"):
        family_of(demo).adapter.encode(demo, ["what is this"], None, None, videos=[frames])


def test_mesh_padding_repeats_the_last_rows_images_and_clips(vlm):
    """`last_row_arrays` names the last row's trailing images, clips and seconds, so a batch
    padded for a mesh repeats exactly that row's arrays (checked on the host: the padded
    batch's extra row lays out like the last row)."""
    from zspa_jax.batch import _repeat_last_row
    from zspa_jax.families import family_of
    from zspa_jax.host import build_host_batch

    a = zspa_jax.encode(
        vlm,
        ["first", "second"],
        [random_image(24, 32, seed=1), [random_image(16, 16, seed=2)]],
        videos=[
            clip(2, 16, 24, seed=3),
            [clip(4, 24, 32, seed=4), Video(clip(2, 16, 16, seed=5), fps=4.0)],
        ],
    )
    adapter = family_of(vlm).adapter
    extras = {
        k: a[k]
        for k in ("image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    }
    tails = adapter.last_row_arrays(vlm, a["input_ids"], extras)
    assert tails == {
        "pixel_values": 16,
        "image_grid_thw": 1,
        "pixel_values_videos": 2 * 6 * 8 + 4 * 4,
        "video_grid_thw": 2,
        "second_per_grid_ts": 2,
    }
    ids, pixels, mask, padded = _repeat_last_row(
        adapter, vlm, a["input_ids"], a["pixel_values"], a["attention_mask"], extras, 1
    )
    np.testing.assert_array_equal(padded["video_grid_thw"][-2:], a["video_grid_thw"][-2:])
    np.testing.assert_array_equal(
        padded["second_per_grid_ts"],
        np.concatenate([a["second_per_grid_ts"], a["second_per_grid_ts"][-2:]]),
    )
    host = build_host_batch(vlm, adapter, ids, pixels, mask, padded, None, 0, False)
    one = build_host_batch(
        vlm,
        adapter,
        a["input_ids"][1:],
        a["pixel_values"][-16:],
        a["attention_mask"][1:],
        {k: v[-tails[k] :] for k, v in extras.items() if k != "image_grid_thw"}
        | {"image_grid_thw": a["image_grid_thw"][-1:]},
        None,
        0,
        False,
    )
    np.testing.assert_array_equal(host.aux.positions[:, 2], one.aux.positions[:, 0])


def test_converter_keeps_tokens_per_second_and_the_video_processor_config(tiny):
    import json

    from convert.qwen2_5_vl import qwen2_5_vl_config_from_hf

    out = converted(tiny)
    assert (
        json.loads((out / "video_preprocessor_config.json").read_text()) == video_processor_config()
    )
    hf = tiny.hf.config.to_dict()
    hf["vision_config"]["tokens_per_second"] = 2
    assert qwen2_5_vl_config_from_hf(hf).vision.tokens_per_second == 2
    assert (
        zspa_jax.load(out).config.vision.tokens_per_second
        == tiny.hf.config.vision_config.tokens_per_second
    )


# ----------------------------------------------------------------------------- logits, kept tokens, tokens


def _record(parity_record, what, config, ours, ref, bound=BOUND):
    d = parity_record(
        what, config, float(np.abs(ours - ref).max()), bound, scale=float(np.abs(ref).max())
    )
    assert d <= bound, (what, config, d)


@pytest.mark.slow
def test_unpruned_logits_match_transformers(tiny, vlm, parity_record):
    """A clip with its frame rate; a row with an image and a clip; a left-padded batch of two
    clips of different lengths and frame rates: logits equal transformers' at every real
    position, and the tower's merged tokens equal get_video_features."""
    one = _clip_arrays(vlm, frames=6, size=(40, 56), seed=10, fps=2.0)
    ours = zspa_jax.forward(vlm, **one)
    _record(
        parity_record, "qwen video logits", "6 frames 40x56", ours, hf_logits(tiny, one), LOGITS
    )

    mixed = zspa_jax.encode(
        vlm,
        ["compare the picture and the clip"],
        [random_image(24, 32, seed=11)],
        videos=[Video(clip(4, 32, 40, seed=12), fps=6.0)],
    )
    assert (
        mixed["pixel_values"] is not None
        and (mixed["input_ids"] == tiny.config.image_token_id).any()
    )
    _record(
        parity_record,
        "qwen video logits",
        "image + clip",
        zspa_jax.forward(vlm, **mixed),
        hf_logits(tiny, mixed),
        LOGITS,
    )

    batch = zspa_jax.encode(
        vlm,
        ["what happens", "describe the clip in detail"],
        videos=[
            Video(clip(8, 24, 32, seed=13), fps=4.0),
            Video(clip(2, 40, 40, seed=14), fps=30.0),
        ],
    )
    mask = batch["attention_mask"].astype(bool)
    assert (~mask).any() and len(set(batch["video_grid_thw"][:, 0].tolist())) == 2
    ours, ref = zspa_jax.forward(vlm, **batch), hf_logits(tiny, batch)
    _record(
        parity_record, "qwen video logits", "left-padded 2 clips", ours[mask], ref[mask], LOGITS
    )

    from flax import nnx

    model = nnx.merge(vlm.graphdef, vlm.state)
    grid = one["video_grid_thw"]
    merged = np.asarray(
        model.image_features(one["pixel_values_videos"], vision_layout(grid, vlm.config.vision))
    )
    with torch.no_grad():
        feats = (
            tiny.hf.model.get_video_features(
                torch.tensor(one["pixel_values_videos"]), torch.tensor(grid)
            )
            .pooler_output[0]
            .numpy()
        )
    _record(
        parity_record,
        "qwen video tower + merger",
        "6 frames 40x56",
        merged[: feats.shape[0]],
        feats,
    )


def _hf_pruned_row(tiny, a: dict, row: int, kept, tokens=None):
    """transformers fed one row's pruned inputs_embeds: the kept placeholders (image and
    video tokens of the row in reading order) at their original 3-D positions from
    get_rope_index. Returns (logits [L', V], mask, the row's visual tokens [N, D], embeds)."""
    t = torch_batch(tiny, a)
    hf, cfg = tiny.hf, tiny.config
    ids, mask = t["input_ids"], t["attention_mask"]
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
        if "pixel_values" in t:
            feats = hf.model.get_image_features(
                t["pixel_values"], t["image_grid_thw"]
            ).pooler_output
            embeds[ids == cfg.image_token_id] = torch.cat(feats)
        feats = hf.model.get_video_features(
            t["pixel_values_videos"], t["video_grid_thw"]
        ).pooler_output
        embeds[ids == cfg.video_token_id] = torch.cat(feats)
        positions, _ = hf.model.get_rope_index(
            ids,
            mm_token_type_ids=t["mm_token_type_ids"],
            image_grid_thw=t.get("image_grid_thw"),
            video_grid_thw=t["video_grid_thw"],
            second_per_grid_ts=t["second_per_grid_ts"],
            attention_mask=mask,
        )
        visual = (ids[row] == cfg.image_token_id) | (ids[row] == cfg.video_token_id)
        slots = torch.nonzero(visual)[:, 0]
        kept_slots = slots[torch.as_tensor(np.asarray(kept))]
        if tokens is not None:
            embeds[row, kept_slots] = tokens
        src = torch.sort(torch.cat([torch.nonzero(~visual)[:, 0], kept_slots])).values
        logits = (
            hf(
                inputs_embeds=embeds[row, src][None],
                position_ids=positions[:, row, src][:, None],
                attention_mask=mask[row, src][None],
            )
            .logits[0]
            .numpy()
        )
    return logits, mask[row, src].numpy().astype(bool), embeds[row, slots], embeds


def _question_mask(tiny, vlm, ids, mask):
    """Real, non-special tokens after each row's last image or video token."""
    tok = tiny.processor.tokenizer
    special = set(tok.all_special_ids) | {tok.pad_token_id, tok.eos_token_id}
    visual = np.isin(ids, [tiny.config.image_token_id, tiny.config.video_token_id])
    out = np.zeros(ids.shape, bool)
    for r in range(ids.shape[0]):
        last = np.flatnonzero(visual[r]).max()
        for j in range(last + 1, ids.shape[1]):
            out[r, j] = mask[r, j] == 1 and int(ids[r, j]) not in special
    return out


PRUNED = {
    # budget -> (K, rows: (prompt, images, videos)); "image": the same item count per row
    "row": (
        12,
        [
            ("what is the red cat doing", None, [Video(clip(6, 32, 40, seed=20), fps=2.0)]),
            (
                "compare the picture and the clip",
                [random_image(24, 32, seed=21)],
                [Video(clip(4, 24, 32, seed=22), fps=4.0)],
            ),
        ],
    ),
    "image": (
        5,
        [
            ("describe both", [random_image(40, 56, seed=23)], [Video(clip(4, 16, 24, seed=24))]),
            (
                "which one moves",
                [random_image(24, 24, seed=25)],
                [Video(clip(8, 24, 24, seed=26), fps=8.0)],
            ),
        ],
    ),
}


def _encode_rows(vlm, rows):
    prompts = [p for p, _, _ in rows]
    images = None if all(i is None for _, i, _ in rows) else [i for _, i, _ in rows]
    return zspa_jax.encode(vlm, prompts, images, videos=[v for _, _, v in rows])


@pytest.mark.parametrize("method", ["zspaprune", "cdpruner"])
@pytest.mark.parametrize("budget", sorted(PRUNED))
@pytest.mark.slow
def test_pruned_logits_and_kept_indices_match_references(tiny, vlm, budget, method, parity_record):
    """K over each row's image and video tokens together ("row"), or over each image and each
    clip ("image"): kept indices equal the eager torch references on transformers' merger
    output, and the logits equal transformers fed the kept tokens at their original 3-D
    positions."""
    keep, rows = PRUNED[budget]
    a = _encode_rows(vlm, rows)
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        **a,
        prune=zspa_jax.PruneConfig(keep=keep, method=method, budget=budget),
        return_kept=True,
        return_mask=True,
    )
    items = [(0 if i is None else len(i)) + len(v) for _, i, v in rows]
    assert kept.shape == (2, keep * max(items) if budget == "image" else keep)
    ids, mask = a["input_ids"], a["attention_mask"]
    qmask = _question_mask(tiny, vlm, ids, mask)
    cfg = tiny.config
    for row in range(2):
        ref, ref_mask, visual, embeds = _hf_pruned_row(tiny, a, row, kept[row])
        prompt = torch.tensor(qmask[row])[None]

        def choose(v):
            if method == "cdpruner":
                return cdpruner_reference(v[None], embeds[row][None], prompt, keep=keep).numpy()[0]
            return select_tokens_reference(
                v[None], embeds[row][None], prompt, keep=keep, core_ratio=0.6
            ).numpy()[0]

        if budget == "row":
            expect = choose(visual)
        else:  # each item's tokens: the runs of one placeholder id between non-placeholders
            row_ids = ids[row][np.isin(ids[row], [cfg.image_token_id, cfg.video_token_id])]
            positions = np.flatnonzero(np.isin(ids[row], [cfg.image_token_id, cfg.video_token_id]))
            breaks = np.flatnonzero((np.diff(positions) > 1) | (np.diff(row_ids) != 0)) + 1
            starts = np.concatenate([[0], breaks])
            sizes = np.diff(np.concatenate([starts, [len(row_ids)]]))
            expect = np.concatenate([choose(visual[s : s + n]) + s for s, n in zip(starts, sizes)])
        np.testing.assert_array_equal(kept[row], expect, err_msg=f"row {row}")
        got = logits[row][out_mask[row].astype(bool)]
        _record(
            parity_record,
            "qwen video pruned logits",
            f"{method} budget={budget} row {row}",
            got,
            ref[ref_mask],
            LOGITS,
        )


@pytest.mark.slow
def test_greedy_generation_matches_transformers(tiny, vlm):
    """Unpruned: a left-padded batch of two clips of different lengths through
    zspa_jax.generate (strings + frames) equals transformers' generate. Pruned: equals
    transformers decoding from the pruned inputs_embeds at the kept tokens' 3-D positions,
    the first new token at the unpruned prompt's largest position + 1."""
    prompts = ["what happens", "describe the clip"]
    videos = [Video(clip(8, 24, 32, seed=30), fps=4.0), Video(clip(4, 40, 40, seed=31), fps=2.0)]
    res = zspa_jax.generate(vlm, prompts, videos=videos, max_new_tokens=8)
    a = zspa_jax.encode(vlm, prompts, videos=videos)
    t = torch_batch(tiny, a)
    with torch.no_grad():
        ref = tiny.hf.generate(**t, max_new_tokens=8, do_sample=False)[
            :, a["input_ids"].shape[1] :
        ].numpy()
    np.testing.assert_array_equal(res.sequences, ref[:, : res.sequences.shape[1]])
    assert (ref[:, res.sequences.shape[1] :] == vlm.pad_token_id).all()

    keep = 10
    one = zspa_jax.encode(vlm, prompts[:1], videos=videos[:1])
    pruned = zspa_jax.generate(
        vlm, prompts[:1], videos=videos[:1], max_new_tokens=6, prune=zspa_jax.PruneConfig(keep=keep)
    )
    kept = pruned.kept_indices[0]
    _, _, _, embeds = _hf_pruned_row(tiny, one, 0, kept)
    t = torch_batch(tiny, one)
    ids = t["input_ids"]
    positions, _ = tiny.hf.model.get_rope_index(
        ids,
        mm_token_type_ids=t["mm_token_type_ids"],
        video_grid_thw=t["video_grid_thw"],
        second_per_grid_ts=t["second_per_grid_ts"],
        attention_mask=t["attention_mask"],
    )
    tokens = hf_greedy_from_pruned(
        tiny.hf, embeds, positions, ids[0] == tiny.config.video_token_id, kept, vlm.eos_token_ids, 6
    )
    assert pruned.sequences[0, : len(tokens)].tolist() == tokens


@pytest.mark.slow
def test_every_qwen_method_serves_clips(tiny, vlm):
    """relevance, divprune, uniform, random (and zspaprune / cdpruner above, FastV / DART
    below) on a batch of a clip and an image + clip row: kept indices equal the references,
    index real tokens only, and budget='image' treats each clip as one item."""
    rows = PRUNED["row"][1]
    a = _encode_rows(vlm, rows)
    keep = 9
    ids, mask = a["input_ids"], a["attention_mask"]
    qmask = _question_mask(tiny, vlm, ids, mask)
    counts = (
        np.isin(ids, [tiny.config.image_token_id, tiny.config.video_token_id]) & (mask == 1)
    ).sum(1)
    for method, core in (("relevance", 1.0), ("divprune", 0.0)):
        kept = zspa_jax.forward(
            vlm, **a, prune=zspa_jax.PruneConfig(keep=keep, method=method), return_kept=True
        )[1]
        for row in range(2):
            _, _, visual, embeds = _hf_pruned_row(tiny, a, row, kept[row])
            expect = select_tokens_reference(
                visual[None],
                embeds[row][None],
                torch.tensor(qmask[row])[None],
                keep=keep,
                core_ratio=core,
            ).numpy()[0]
            np.testing.assert_array_equal(kept[row], expect, err_msg=f"{method} row {row}")
    kept = zspa_jax.forward(
        vlm, **a, prune=zspa_jax.PruneConfig(keep=keep, method="uniform"), return_kept=True
    )[1]
    for row in range(2):
        np.testing.assert_array_equal(
            kept[row], np.floor((np.arange(keep) + 0.5) * counts[row] / keep).astype(int)
        )
    kept = zspa_jax.forward(
        vlm, **a, prune=zspa_jax.PruneConfig(keep=keep, method="random"), return_kept=True
    )[1]
    assert all(
        len(set(k.tolist())) == keep and k.max() < n and (np.diff(k) > 0).all()
        for k, n in zip(kept, counts)
    )
    res = zspa_jax.generate(
        vlm,
        [p for p, _, _ in PRUNED["image"][1]],
        [i for _, i, _ in PRUNED["image"][1]],
        videos=[v for _, _, v in PRUNED["image"][1]],
        max_new_tokens=2,
        prune=zspa_jax.PruneConfig(keep=4, budget="image"),
    )
    assert res.kept_indices.shape == (2, 8) and res.stats["visual_tokens_kept_per_row"] == 8


@pytest.mark.parametrize("method", ["fastv", "dart"])
@pytest.mark.slow
def test_in_llm_methods_on_a_clip_match_transformers(method, parity_record):
    """FastV / DART choose among a clip's tokens at layer K-1 and drop the others from layer K:
    kept indices equal the references on transformers' own layer internals, and the logits
    equal transformers with those tokens dropped at layer K (tests/test_qwen2_5_vl_llm_methods.py)."""
    from tests.support.drop_at_layer import QwenDropAtLayer, qwen_layer_internals

    LAYER, TEXT_LAYERS = 2, 3  # as tests/test_qwen2_5_vl_llm_methods.py

    tiny = tiny_model(text_layers=TEXT_LAYERS)
    vlm = zspa_jax.load(converted(tiny))
    keep = 6
    a = zspa_jax.encode(
        vlm,
        ["what is the dog doing on the left"],
        videos=[Video(clip(6, 24, 40, seed=40), fps=3.0)],
    )
    t = torch_batch(tiny, a)
    prune = zspa_jax.PruneConfig(keep=keep, method=method, layer=LAYER)
    logits, kept, out_mask = zspa_jax.forward(
        vlm, **a, prune=prune, return_kept=True, return_mask=True
    )
    ids = t["input_ids"][0]
    where = torch.nonzero(ids == tiny.config.video_token_id)[:, 0]
    start, n = int(where[0]), len(where)
    assert (where == start + torch.arange(n)).all()
    attention, keys, hidden = qwen_layer_internals(tiny, t, LAYER - 1)
    if method == "fastv":
        expect = np.sort(
            torch.sort(attention[start : start + n], descending=True, stable=True)
            .indices[:keep]
            .numpy()
        )
    else:
        from tests.support.torch_reference_dart import dart_select_reference

        tok = tiny.processor.tokenizer
        special = set(tok.all_special_ids) | {tok.pad_token_id, tok.eos_token_id}
        question = torch.tensor(
            [j > where.max() and int(ids[j]) not in special for j in range(len(ids))]
        )[None]
        with torch.no_grad():
            expect = dart_select_reference(
                hidden[None],
                keys[None],
                torch.tensor([start]),
                question,
                num_visual=n,
                keep=keep,
                norm_weight=tiny.hf.model.language_model.norm.weight,
            ).numpy()[0]
    np.testing.assert_array_equal(kept[0], expect)
    src = np.concatenate([np.arange(start), start + kept[0], np.arange(start + n, len(ids))])
    hooks = QwenDropAtLayer(tiny.hf.model.language_model, LAYER, src, len(ids))
    try:
        with torch.no_grad():
            ref = tiny.hf(**t).logits[0].numpy()
    finally:
        hooks.remove()
    assert hooks.calls == {"prefill": TEXT_LAYERS - LAYER, "decode": 0}
    _record(
        parity_record,
        f"qwen video {method} pruned logits",
        f"K={LAYER} keep={keep}",
        logits[0][out_mask[0].astype(bool)],
        ref,
    )


@pytest.mark.slow
def test_one_program_across_clip_lengths(vlm):
    """Clips of 5, 6, 7 and 8 temporal patches (10-16 frames; one temporal bucket of 8) share
    one compiled prefill and decode program, pruned and unpruned."""
    assert {temporal_bucket(t) for t in (5, 6, 7, 8)} == {8}
    for prune in (zspa_jax.PruneConfig(keep=16), None):
        zspa_jax.generate(
            vlm, ["what happens"], videos=[clip(16, 24, 32, seed=50)], max_new_tokens=4, prune=prune
        )
        before = dict(generation.TRACE_COUNTS)
        grids = []
        for frames in (10, 12, 14):
            res = zspa_jax.generate(
                vlm,
                ["what happens"],
                videos=[clip(frames, 24, 32, seed=frames)],
                max_new_tokens=4,
                prune=prune,
            )
            grids.append(
                int(
                    zspa_jax.encode(vlm, ["x"], videos=[clip(frames, 24, 32, seed=0)])[
                        "video_grid_thw"
                    ][0, 0]
                )
            )
            assert res.sequences.shape[0] == 1
        assert grids == [5, 6, 7]
        assert dict(generation.TRACE_COUNTS) == before, (
            prune,
            before,
            dict(generation.TRACE_COUNTS),
        )


MESH_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import zspa_jax
from tests.support.tiny_qwen2_5_vl import random_clip, random_image
path = sys.argv[1]
one, many = zspa_jax.load(path), zspa_jax.load(path, mesh=jax.make_mesh((2, 2), ("data", "model")))
prompts = ["what happens", "describe the clip", "compare"]  # 3 rows on data=2: padded with the last row
videos = [zspa_jax.Video(random_clip(6, 24, 32, 1), fps=2.0), random_clip(4, 40, 40, 2),
          [random_clip(2, 16, 24, 3), random_clip(4, 24, 24, 4)]]
images = [None, random_image(24, 32, 5), [random_image(16, 16, 6)]]
out = {}
for name, prune in (("unpruned", None), ("pruned", zspa_jax.PruneConfig(keep=6))):
    a, b = (zspa_jax.generate(m, prompts, images, videos=videos, max_new_tokens=5, prune=prune) for m in (one, many))
    out[name] = [a.sequences.tolist(), b.sequences.tolist(),
                 None if a.kept_indices is None else [a.kept_indices.tolist(), b.kept_indices.tolist()]]
enc = zspa_jax.encode(one, prompts, images, videos=videos)
la, lb = zspa_jax.forward(one, **enc), zspa_jax.forward(many, **enc)
mask = enc["attention_mask"].astype(bool)
out["logits"] = [float(np.abs(la - lb)[mask].max()), float(np.abs(la[mask]).max())]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_clips_on_a_mesh_equal_one_device(tiny, parity_record):
    """Images and clips (a batch of 3 rows padded to data=2 by repeating the last row's image,
    clips and seconds) on a 2 x 2 mesh of host devices: the same tokens and kept indices as
    one device, logits within 64 float32 ulps of the largest (tests/test_sharding.py's bound)."""
    import json
    import os
    import subprocess
    import sys

    from tests.support.paths import REPO_ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(converted(tiny))],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(
        next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]
    )
    for name in ("unpruned", "pruned"):
        single, mesh, kept = out[name]
        assert single == mesh, name
        assert kept is None if name == "unpruned" else kept[0] == kept[1]
    diff, scale = out["logits"]
    bound = 64 * float(np.spacing(np.float32(scale)))
    assert (
        parity_record("qwen video logits (2x2 mesh vs 1 device)", "3 rows, padded", diff, bound)
        <= bound
    )
