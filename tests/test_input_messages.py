"""Bad input gets a message that names the argument and the real problem (fast, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from convert.hf_config import UnsupportedConfigError
from convert.qwen2_5_vl import qwen2_5_vl_config_from_hf
from models.layers import DTYPES
from models.qwen2_5_vl import Qwen2_5_VLVisionConfig
from zspa_jax.estimate import main as estimate_main
from zspa_jax.eval.args import parse_model_args
from zspa_jax.families.qwen2_5_vl.layout import check_grid


def test_grid_messages_name_the_real_problem():
    cfg = Qwen2_5_VLVisionConfig()
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\] = \(0, 6, 8\): t must be >= 1"):
        check_grid(np.array([[0, 6, 8]]), cfg)
    with pytest.raises(
        ValueError, match="image_grid_thw must be an integer array .* got dtype float"
    ):
        check_grid(np.array([[1.0, 6.0, 8.0]]), cfg)
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        check_grid(np.array([1, 6, 8]), cfg)
    assert check_grid(np.array([[1, 6, 8]]), cfg).tolist() == [[1, 6, 8]]


def test_qwen_converter_says_which_config_section_is_missing():
    for hf, missing in (
        ({"vision_config": {"depth": 1}}, "text_config"),
        ({"text_config": {"vocab_size": 9}}, "vision_config"),
        ({}, "text_config and no vision_config"),
    ):
        with pytest.raises(UnsupportedConfigError, match=f"config has no {missing}"):
            qwen2_5_vl_config_from_hf({"model_type": "qwen2_5_vl", **hf})


@pytest.mark.parametrize("image", ["0x0", "abc", "12x", "0x8", "3x4x5"])
def test_estimate_cli_bad_image_is_one_error_line(image, capsys):
    with pytest.raises(SystemExit) as exit_info:
        estimate_main(["--model", "qwen2.5-vl-7b", "--image", image])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        f"error: --image must be HxW with positive integer pixel sizes (e.g. 1344x1008), got {image!r}"
    )
    assert not any("Traceback" in line for line in err)


def test_lmms_eval_dtype_takes_what_load_takes():
    from zspa_jax.demo import DEMO_MODEL_DIR

    for dtype in DTYPES:  # zspa_jax.load(dtype=) accepts exactly these
        assert parse_model_args({"pretrained": str(DEMO_MODEL_DIR), "dtype": dtype}).dtype == dtype
    with pytest.raises(ValueError, match="dtype"):
        parse_model_args({"pretrained": str(DEMO_MODEL_DIR), "dtype": "int8"})
