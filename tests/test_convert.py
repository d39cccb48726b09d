"""Converter and loader failure modes: each a clear error, and never a half-written OUT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zspa_jax
from convert.llava import ConversionError, convert


@pytest.fixture(scope="module")
def src(tiny_hf_llava):
    return tiny_hf_llava("convert").path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def _fail(src, out, match: str, **kwargs) -> None:
    with pytest.raises(ConversionError, match=match):
        convert(src, out, progress=False, **kwargs)


def test_missing_config(src, tmp_path):
    bad = _copy(src, tmp_path)
    (bad / "config.json").unlink()
    out = tmp_path / "out"
    _fail(bad, out, "config.json is missing")
    _assert_nothing_written(out)


@pytest.mark.slow
def test_unreadable_config(src, tmp_path):
    bad = _copy(src, tmp_path)
    (bad / "config.json").write_text('{"model_type": "llava", ')  # truncated JSON
    out = tmp_path / "out"
    _fail(bad, out, r"config.json could not be read by transformers: .+")
    _assert_nothing_written(out)


@pytest.mark.slow
def test_missing_weights(src, tmp_path):
    bad = _copy(src, tmp_path)
    (bad / "model.safetensors").unlink()
    out = tmp_path / "out"
    _fail(bad, out, "no weights found")
    _assert_nothing_written(out)


@pytest.mark.slow
def test_truncated_safetensors(src, tmp_path):
    bad = _copy(src, tmp_path)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _fail(bad, out, "truncated safetensors file")
    _assert_nothing_written(out)


@pytest.mark.slow
def test_missing_shard_of_an_index(src, tmp_path):
    bad = _copy(src, tmp_path)
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    _fail(bad, out, "shards listed in .* are missing")
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    "edit, field",
    [
        (
            lambda c: c["text_config"].update(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256,
                }
            ),
            "rope_type='llama3'",
        ),
        (
            lambda c: c["text_config"].update(
                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
            ),
            "rope_type='yarn'",
        ),
        (lambda c: c["text_config"].update(hidden_act="gelu"), "text_config.hidden_act='gelu'"),
        (
            lambda c: c["text_config"].update(rope_interleaved=True),
            "text_config.rope_interleaved=True",
        ),
        (lambda c: c["text_config"].update(sliding_window=128), "text_config.sliding_window"),
        (
            lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
            "vision_config.model_type",
        ),
        (
            lambda c: c.update(vision_feature_select_strategy="pooled"),
            "vision_feature_select_strategy",
        ),
    ],
)
@pytest.mark.slow
def test_unsupported_config_field_is_refused_by_name(src, tmp_path, edit, field):
    bad = _copy(src, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg)
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert(bad, out, progress=False)
    assert field in str(err.value)
    _assert_nothing_written(out)


@pytest.mark.slow
def test_all_mapping_errors_are_reported_together(src, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = _copy(src, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("language_model.model.norm.weight")
    tensors.pop("multi_modal_projector.linear_2.bias")
    tensors["vision_tower.mystery.weight"] = np.zeros(3, np.float32)
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:, :-1].copy()
    save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert(bad, out, progress=False)
    message = str(err.value)
    assert "4 problem(s)" in message
    for expected in (
        "language_model.model.norm.scale",
        "multi_modal_projector.linear_2.bias",
        "vision_tower.mystery.weight",
        "q_proj.weight",
    ):
        assert expected in message
    _assert_nothing_written(out)


@pytest.mark.slow
def test_existing_out_needs_force_and_force_replaces_only_a_checkpoint(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fail(src, out, "already exists; pass --force")
    _fail(
        src,
        out,
        "not a zspa_jax checkpoint directory; --force only replaces a previous checkpoint",
        force=True,
    )
    assert (out / "keep.txt").read_text() == "mine"
    ordinary_file = tmp_path / "notes.txt"
    ordinary_file.write_text("mine")
    _fail(src, ordinary_file, "not a zspa_jax checkpoint directory", force=True)
    assert ordinary_file.read_text() == "mine"

    checkpoint = tmp_path / "ckpt"
    convert(src, checkpoint, progress=False)
    (checkpoint / "stale.txt").write_text("from the previous conversion")
    summary = convert(src, checkpoint, force=True, progress=False)
    assert not (checkpoint / "stale.txt").exists()
    assert summary["parameters"] > 0
    assert zspa_jax.load(checkpoint).config.image_token_index > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes.txt", "out"]


def test_bad_dtype_and_hub_id_offline(src, tmp_path, monkeypatch):
    _fail(src, tmp_path / "out", "--dtype 'float64' is not supported", dtype="float64")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fail("llava-hf/llava-1.5-7b-hf", tmp_path / "out", "HF_HUB_OFFLINE is set")
    _fail(
        str(tmp_path / "nowhere" / "x" / "y"),
        tmp_path / "out",
        "neither an existing directory nor a hub id",
    )


@pytest.mark.slow
def test_cli_reports_errors_without_a_traceback(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "convert.llava", str(src), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert "error: OUT" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_by_block_loading_equals_whole_tensor_transforms(tmp_path, dtype):
    """load_tensor builds each parameter from row blocks (here as small as one row); the
    result must equal transposing / casting the whole source tensor at once."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from convert.keymap import Transform
    from convert.llava import Step, load_tensor
    from convert.safetensors_io import SafetensorsCheckpoint

    rng = np.random.default_rng(0)
    tensors = {
        "linear": (rng.standard_normal((7, 5)).astype(np.float16), Transform.LINEAR, lambda x: x.T),
        "conv": (
            rng.standard_normal((6, 3, 2, 2)).astype(np.float32),
            Transform.CONV,
            lambda x: x.transpose(2, 3, 1, 0),
        ),
        "table": (rng.standard_normal((9, 4)).astype(np.float32), Transform.IDENTITY, lambda x: x),
        "bias": (rng.standard_normal((11,)).astype(np.float16), Transform.IDENTITY, lambda x: x),
        "scalar": (np.asarray(3.5, np.float32), Transform.IDENTITY, lambda x: x),
    }
    save_file({k: v for k, (v, _, _) in tensors.items()}, str(tmp_path / "model.safetensors"))
    checkpoint = SafetensorsCheckpoint(tmp_path)
    target = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    for key, (source, transform, reference) in tensors.items():
        step = Step(key, key, transform, transform.target_shape(source.shape))
        want = np.asarray(reference(source)).astype(target)
        for block_bytes in (1, 24, 1 << 20):  # one row per block, a few rows, the whole tensor
            got = load_tensor(checkpoint, step, target, block_bytes=block_bytes)
            assert got.dtype == target and got.shape == want.shape, (key, block_bytes)
            as_bytes = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # noqa: E731  (exact, NaN-safe)
            np.testing.assert_array_equal(
                as_bytes(got), as_bytes(want), err_msg=f"{key} {block_bytes}"
            )


def test_load_of_a_non_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        zspa_jax.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="zspa_config.json missing"):
        zspa_jax.load(tmp_path)


def test_forward_rejects_bad_pixels_and_image_token_counts(tiny_hf_llava, converted):
    tiny = tiny_hf_llava("convert")
    vlm = zspa_jax.load(converted(tiny.path))
    n = tiny.tokens_per_image
    ids = np.concatenate([[tiny.bos_token_id], np.full(n, tiny.image_token_index), [20, 21]])[None]
    good = np.zeros((1, 3, tiny.image_size, tiny.image_size), np.float32)
    with pytest.raises(
        ValueError,
        match=r"pixel_values must be a float array \[num_images, 3, 28, 28\] \(NCHW\), got shape",
    ):
        zspa_jax.forward(vlm, ids, good[:, :, :20])
    with pytest.raises(ValueError, match=rf"holds {n - 1} image tokens .* = {n}"):
        zspa_jax.forward(vlm, np.delete(ids, 1, axis=1), good)
    with pytest.raises(ValueError, match="input_ids holds image tokens but pixel_values is None"):
        zspa_jax.forward(vlm, ids, None)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        zspa_jax.forward(vlm, ids, good, attention_mask=np.ones((1, 3)))


def test_load_places_parameters_on_the_device_once(tiny_hf_llava, converted):
    """Host numpy parameters would be copied to the device by every jitted call (the whole
    model per generate call); `load` must hand back device arrays in their saved dtype."""
    import jax

    vlm = zspa_jax.load(converted(tiny_hf_llava("convert").path), processor=False)
    leaves = jax.tree.leaves(vlm.state)
    assert leaves
    not_on_device = [type(x).__name__ for x in leaves if not isinstance(x, jax.Array)]
    assert not not_on_device, (
        f"{len(not_on_device)} of {len(leaves)} parameters are host arrays: {set(not_on_device)}"
    )
    assert {x.dtype for x in leaves} == {np.dtype(np.float32)}


@pytest.mark.slow
def test_out_problems_are_one_line_errors_and_leave_nothing(src, tmp_path, monkeypatch):
    parent_file = tmp_path / "a_file"
    parent_file.write_text("not a directory")
    _fail(src, parent_file / "out", "is a file, not a directory")
    _fail(src, parent_file / "deeper" / "out", "is a file, not a directory")
    assert parent_file.read_text() == "not a directory"
    _fail(src, "/sys/zspa_convert_out", "cannot write into /sys")  # a virtual filesystem

    import errno

    import models.checkpoint

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models.checkpoint.ParamWriter, "_flush", no_space)
    out = tmp_path / "out"
    _fail(src, out, r"writing .*out failed \(No space left on device\); nothing was written")
    _assert_nothing_written(out)


@pytest.mark.slow
def test_cli_out_problem_is_one_line(src, tmp_path):
    parent_file = tmp_path / "a_file"
    parent_file.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "convert.llava", str(src), str(parent_file / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"error: cannot create OUT {parent_file / 'out'}: {parent_file} is a file, not a directory"
    ]


@pytest.mark.slow
def test_conversion_prints_no_orbax_warnings(src, converted):
    proc = converted.process(src)
    assert "absl" not in proc.stderr and "TypeHandlerRegistry" not in proc.stderr, proc.stderr[
        -2000:
    ]


def _expected_layout(key: str, tensor: np.ndarray) -> np.ndarray:
    """Our layout of one HF tensor, stated independently of convert.keymap: every 2-D weight
    other than an embedding table is a torch Linear [out, in] -> flax kernel [in, out]; the
    4-D patch embedding is OIHW -> HWIO; everything else is copied unchanged."""
    if tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key:
        return tensor.T
    if tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    return tensor


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_every_converted_parameter_equals_its_hf_tensor(src, tmp_path, dtype):
    """Each parameter of the converted checkpoint equals its HF tensor in our layout, exactly
    (after the cast). Square linears (the vision tower's q/k/v/out, the decoder's q/o) are
    included: a missing transpose keeps their shape, so only their values can show it."""
    import ml_dtypes
    from flax import nnx
    from safetensors.numpy import load_file

    from convert.keymap import map_key
    from models.checkpoint import flatten
    from zspa_jax.families import read_config, restore_model

    out = tmp_path / "out"
    convert(src, out, dtype=dtype, progress=False)
    model = restore_model(out, read_config(out))
    ours = {
        k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
    }
    target = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    hf = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        hf.update(load_file(f))
    compared, square = set(), set()
    for key, tensor in hf.items():
        mapped = map_key(key)
        if mapped is None:  # buffers the converter skips (position ids); nothing to compare
            continue
        path = mapped[0]
        want = np.ascontiguousarray(_expected_layout(key, tensor)).astype(target)
        got = ours[path]
        assert got.dtype == target and got.shape == want.shape, (key, path, got.shape, want.shape)
        as_bytes = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # noqa: E731  (exact)
        np.testing.assert_array_equal(as_bytes(got), as_bytes(want), err_msg=f"{key} -> {path}")
        compared.add(path)
        if tensor.ndim == 2 and tensor.shape[0] == tensor.shape[1] and "embed" not in key:
            square.add(key.split(".")[-2])
    assert compared == set(ours), f"parameters without an HF tensor: {sorted(set(ours) - compared)}"
    # The test data really covers square attention projections (where only values can catch a bad transpose).
    assert {"q_proj", "k_proj", "v_proj"} <= square and square & {"o_proj", "out_proj"}, square
