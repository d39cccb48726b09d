"""The frame resize of transformers' Qwen2-VL video processor, in numpy.

The video processor resizes uint8 frames with torchvision's `resize(..., BICUBIC,
antialias=True)`, which on CPU is torch's native uint8 kernel
(`interpolate(mode="bicubic", antialias=True, align_corners=False)`, ATen's
UpSampleKernel.cpp, after Pillow-SIMD's Resample.c): per axis, weights from the Keys
cubic kernel with a = -0.5 stretched by the scale when shrinking (support 2 * scale),
normalised, then rounded to int16 fixed point with the largest precision (<= 22 bits) that
keeps the largest weight below 2^15; each output is (2^(p-1) + sum(pixel * weight)) >> p,
clamped to [0, 255]; the horizontal pass runs first, the vertical pass reads its uint8
result. PIL's own BICUBIC resize (what the Qwen2-VL *image* processor uses) computes
differently and differs by a grey level on some pixels, so frames are resized here, not
with PIL. tests/test_qwen2_5_vl_video.py checks this against torch over many sizes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_bicubic_uint8"]

_A = -0.5  # the cubic kernel's a for antialiased bicubic (PIL's)
_SUPPORT = 2.0  # half the kernel width (interp_size 4 / 2)


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
    far = ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index [out], int weights [out, k] (0 past each output's taps), precision)."""
    scale = in_size / out_size  # area_pixel_compute_scale, align_corners=False, no explicit scale
    support = _SUPPORT * scale if scale >= 1.0 else _SUPPORT
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    k = int(np.ceil(support)) * 2 + 1
    centers = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum(
        (centers - support + 0.5).astype(np.int64), 0
    )  # C++ casts truncate toward zero
    xsize = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(k)
    w = _cubic((j[None, :] + xmin[:, None] - centers[:, None] + 0.5) * invscale)
    w = np.where(j[None, :] < xsize[:, None], w, 0.0)
    # Sequential sums like ATen's loop (numpy's pairwise sum can round differently)
    total = np.zeros((out_size, 1))
    for c in range(k):
        total[:, 0] += np.where(c < xsize, w[:, c], 0.0)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    w_max = w.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    ints = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, ints, precision


def _pass(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass over `axis` of a uint8 array."""
    in_size = x.shape[axis]
    xmin, w, precision = _weights(in_size, out_size)
    x = np.moveaxis(x, axis, -1).astype(np.int64)
    index = np.minimum(
        xmin[:, None] + np.arange(w.shape[1])[None, :], in_size - 1
    )  # taps past xsize weigh 0
    acc = np.full(x.shape[:-1] + (out_size,), 1 << (precision - 1) if precision else 0, np.int64)
    for c in range(w.shape[1]):
        acc += x[..., index[:, c]] * w[:, c]
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_bicubic_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [..., H, W] (channels first) -> uint8 [..., height, width], exactly torch's
    `interpolate(x, (height, width), mode="bicubic", antialias=True)` on uint8 on CPU."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames.copy()
    if w != width:
        frames = _pass(frames, width, frames.ndim - 1)
    if h != height:
        frames = _pass(frames, height, frames.ndim - 2)
    return frames
