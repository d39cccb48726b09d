"""Images as users hand them over: 16-bit greyscale is scaled to 8 bits (never clipped),
32-bit modes with no agreed range are refused by name, in both families' processors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import zspa_jax
from zspa_jax.demo import DEMO_MODEL_DIR
from zspa_jax.families.images import to_rgb
from zspa_jax.families.qwen2_5_vl import QwenProcessor


def _sixteen_bit(seed: int, size=(40, 56)) -> tuple[Image.Image, Image.Image]:
    """A 16-bit greyscale image and the 8-bit image it stands for (value = 257 * v8)."""
    v8 = np.random.default_rng(seed).integers(0, 256, size=size).astype(np.uint8)
    img16, img8 = Image.fromarray(v8.astype(np.uint16) * 257), Image.fromarray(v8)
    assert (img16.mode, img8.mode) == ("I;16", "L")
    return img16, img8


def test_to_rgb_scales_sixteen_bit_and_refuses_unknown_ranges():
    img16, img8 = _sixteen_bit(0)
    assert np.asarray(img16.convert("RGB")).mean() > 250  # what PIL alone does: nearly all white
    np.testing.assert_array_equal(
        np.asarray(to_rgb(img16, "image")), np.asarray(img8.convert("RGB"))
    )
    for mode, pixels in (("I", np.zeros((4, 4), np.int32)), ("F", np.zeros((4, 4), np.float32))):
        image = Image.fromarray(pixels)
        assert image.mode == mode
        with pytest.raises(ValueError, match=f"images\\[2\\].*mode '{mode}'.*8-bit"):
            to_rgb(image, "images[2]")


def test_llava_encode_of_a_sixteen_bit_image_equals_its_eight_bit_image():
    vlm = zspa_jax.load(DEMO_MODEL_DIR)
    img16, img8 = _sixteen_bit(1, size=(96, 96))
    a = zspa_jax.encode(vlm, "what colour is it ?", img16)
    b = zspa_jax.encode(vlm, "what colour is it ?", img8)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="images\\[0\\].*mode 'F'"):
        zspa_jax.encode(vlm, "what colour is it ?", Image.fromarray(np.zeros((96, 96), np.float32)))


def test_qwen_encode_of_a_sixteen_bit_image_equals_its_eight_bit_image(tmp_path):
    from tests.support.tiny_qwen2_5_vl import build_processor

    build_processor(tmp_path)
    processor = QwenProcessor.load(tmp_path)
    img16, img8 = _sixteen_bit(2)
    a = processor.encode(["describe the image"], [img16])
    b = processor.encode(["describe the image"], [img8])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
