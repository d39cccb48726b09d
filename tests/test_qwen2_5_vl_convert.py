"""`python -m convert.qwen2_5_vl`: both key layouts, refused configs, tied/untied heads,
every mapping problem reported together, OUT untouched on failure."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from convert.core import ConversionError
from convert.qwen2_5_vl import convert, map_key
from models.checkpoint import flatten, restore_params
from tests.support.tiny_qwen2_5_vl import convert_cli, converted, tiny_model
from zspa_jax.families import param_template, read_config


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _rewrite(src, dst, rename):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({rename(k): v.contiguous() for k, v in tensors.items()}, str(f), {"format": "pt"})
    return dst


def _in_memory(key: str) -> str:
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key.startswith("visual."):
        return "model." + key
    return key


def _params(out):
    cfg = read_config(out)
    return {k: np.asarray(v) for k, v in flatten(restore_params(out, param_template(cfg))).items()}


@pytest.mark.slow
def test_both_layouts_give_identical_params(tiny, tmp_path):
    """The CLI in a subprocess (the one test that runs it; the others convert in process)
    on the saved layout, and `convert` on the in-memory layout: the same parameters."""
    proc = convert_cli(tiny.path, tmp_path / "cli")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = _params(tmp_path / "cli")
    assert any(k.startswith("visual.") for k in saved) and "language_model.lm_head.kernel" in saved
    src = _rewrite(tiny.path, tmp_path / "in_memory", _in_memory)
    convert(src, tmp_path / "out", progress=False)
    other = _params(tmp_path / "out")
    assert saved.keys() == other.keys()
    for k in saved:
        np.testing.assert_array_equal(saved[k], other[k], err_msg=k)
    # The Conv3d patch embedding is stored as a matmul kernel [C*T*p*p, D].
    w = tiny.hf.model.visual.patch_embed.proj.weight.detach().numpy()
    np.testing.assert_array_equal(saved["visual.patch_embed.kernel"], w.reshape(w.shape[0], -1).T)
    assert (
        read_config(tmp_path / "out").text.qkv_bias
        and not read_config(tmp_path / "out").text.attention_bias
    )


def test_key_table():
    assert (
        map_key("model.layers.3.self_attn.q_proj.bias")[0]
        == "language_model.model.layers.3.self_attn.q_proj.bias"
    )
    assert map_key("model.language_model.norm.weight")[0] == "language_model.model.norm.scale"
    assert map_key("model.visual.merger.mlp.2.weight")[0] == "visual.merger.fc2.kernel"
    assert map_key("visual.blocks.0.attn.qkv.weight")[0] == "visual.blocks.0.attn.qkv.kernel"
    assert map_key("lm_head.weight")[0] == "language_model.lm_head.kernel"
    assert map_key("visual.something_new.weight") is None


@pytest.mark.slow
def test_tied_head_has_no_lm_head(tmp_path):
    tiny = tiny_model(tie_word_embeddings=True, seed=1)
    params = _params(converted(tiny))
    assert not any(k.startswith("language_model.lm_head") for k in params)
    assert read_config(converted(tiny)).text.tie_word_embeddings


def _with_config(tiny, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(tiny.path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def hf_config_dict(tiny):
    from convert.core import load_hf_config

    return load_hf_config(tiny.path)  # as transformers reads it (a child process: read once)


REFUSALS = {
    "sliding_window": (
        lambda c: c["text_config"].update(use_sliding_window=True, sliding_window=8),
        "use_sliding_window",
    ),
    "layer_types": (
        lambda c: c["text_config"].update(layer_types=["sliding_attention", "full_attention"]),
        "layer_types",
    ),
    "rope_type": (
        lambda c: c["text_config"]["rope_parameters"].update(rope_type="linear", factor=2.0),
        "rope_type='linear'",
    ),
    "no_mrope": (
        lambda c: c["text_config"]["rope_parameters"].pop("mrope_section"),
        "mrope_section is missing",
    ),
    "vision_rope": (
        lambda c: c["vision_config"].update(rope_parameters={"rope_type": "2d"}),
        "vision_config.rope_parameters",
    ),
    "unknown_vision_field": (
        lambda c: c["vision_config"].update(deepstack_visual_indexes=[1]),
        "deepstack_visual_indexes",
    ),
    "unknown_text_field": (
        lambda c: c["text_config"].update(attn_logit_softcapping=30.0),
        "attn_logit_softcapping",
    ),
    "unknown_top_field": (lambda c: c.update(use_temporal_merge=True), "use_temporal_merge"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_unsupported_config(hf_config_dict, case):
    import copy

    from convert.hf_config import UnsupportedConfigError
    from convert.qwen2_5_vl import qwen2_5_vl_config_from_hf

    edit, needle = REFUSALS[case]
    cfg = copy.deepcopy(hf_config_dict)
    edit(cfg)
    with pytest.raises(UnsupportedConfigError) as err:
        qwen2_5_vl_config_from_hf(cfg)
    assert needle in str(err.value)


@pytest.mark.slow
def test_refusal_leaves_out_untouched(tiny, tmp_path):
    """Through the converter (transformers reads the edited config.json): nothing at OUT."""
    src = _with_config(tiny, tmp_path, REFUSALS["sliding_window"][0])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="use_sliding_window"):
        convert(src, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
def test_reports_every_mapping_problem(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "broken"
    shutil.copytree(tiny.path, src)
    f = next(src.glob("*.safetensors"))
    tensors = load_file(str(f))
    del tensors["visual.merger.ln_q.weight"]
    tensors["visual.blocks.0.attn.qkv.bias"] = tensors["visual.blocks.0.attn.qkv.bias"][
        :5
    ].contiguous()
    tensors["visual.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(f), {"format": "pt"})
    with pytest.raises(ConversionError) as err:
        convert(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert (
        "visual.merger.ln_q.scale" in msg
        and "visual.blocks.0.attn.qkv.bias" in msg
        and "visual.extra.weight" in msg
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_legacy_hub_config_reads_like_the_nested_one(tiny, tmp_path, hf_config_dict):
    """Hub configs written by transformers 4.x keep the text fields at the top level with
    rope_scaling {"type": "mrope"} and legacy names (in_chans, spatial_patch_size,
    vision_token_id) that transformers ignores: they must give the same config."""
    from convert.core import load_hf_config
    from convert.qwen2_5_vl import qwen2_5_vl_config_from_hf

    cfg = json.loads((tiny.path / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    legacy = {**cfg, **{k: v for k, v in text.items() if k not in ("model_type", "dtype")}}
    legacy["rope_theta"] = rope["rope_theta"]
    legacy["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    legacy["vision_config"].update(
        in_chans=3, spatial_patch_size=legacy["vision_config"]["patch_size"]
    )
    legacy["vision_token_id"] = 12345
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(legacy))
    ours = qwen2_5_vl_config_from_hf(load_hf_config(tmp_path / "legacy"))
    assert ours == qwen2_5_vl_config_from_hf(hf_config_dict)
