"""convert.qwen3_vl without converting: the key table against transformers' parameter names
(hub / save_pretrained layout and the older top-level one) and the config allowlist."""

from __future__ import annotations

import pytest

from convert.hf_config import UnsupportedConfigError
from convert.qwen3_vl import map_key, qwen3_vl_config_from_hf
from models.checkpoint import flatten, param_template
from models.qwen3_vl import Qwen3VLForConditionalGeneration
from tests.test_qwen3_vl_model import _hf_config


def _older_layout(key: str) -> str:
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


@pytest.mark.parametrize("tied", [False, True])
def test_every_transformers_tensor_maps_onto_our_tree(tied):
    import torch
    from transformers import Qwen3VLForConditionalGeneration as HFModel

    hf_cfg = _hf_config()
    hf_cfg.tie_word_embeddings = tied
    with torch.device("meta"):
        hf = HFModel(hf_cfg)
    cfg = qwen3_vl_config_from_hf(hf_cfg.to_dict())
    assert cfg.text.tie_word_embeddings is tied
    targets = flatten(param_template(cfg, Qwen3VLForConditionalGeneration))
    keys = list(hf.state_dict())  # tied: lm_head.weight listed too (core drops it)
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in keys)
    paths = {}
    for key in keys:
        path, transform = map_key(key)
        assert map_key(_older_layout(key)) == (path, transform), key
        paths[key] = path
    head = "language_model.lm_head.kernel"
    assert [k for k, p in paths.items() if p == head] == ["lm_head.weight"]
    assert len(set(paths.values())) == len(paths)
    # tied: the head maps outside the tree (the converter drops it), nothing else does
    assert set(paths.values()) == set(targets) | ({head} if tied else set())


def _refusal(mutate) -> str:
    d = _hf_config().to_dict()
    mutate(d)
    with pytest.raises(UnsupportedConfigError) as err:
        qwen3_vl_config_from_hf(d)
    return str(err.value)


def test_refuses_what_it_does_not_implement_all_at_once():
    def mutate(d):
        d["text_config"]["rope_parameters"]["mrope_interleaved"] = False
        d["text_config"]["sliding_window"] = 4096
        d["vision_config"]["rope_parameters"] = {"rope_type": "2d", "rope_theta": 10000.0}
        d["vision_config"]["patch_size"] = [16, 16]

    message = _refusal(mutate)
    for field in (
        "mrope_interleaved",
        "sliding_window",
        "vision_config.rope_parameters",
        "patch_size",
    ):
        assert field in message
    assert "rope_type='yarn'" in _refusal(
        lambda d: d["text_config"]["rope_parameters"].update(rope_type="yarn")
    )
    assert "qwen2_5_vl" in _refusal(lambda d: d.update(model_type="qwen2_5_vl"))
    # a section that does not cover head_dim / 2 frequencies is refused, not misread
    assert "mrope_section" in _refusal(
        lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[4, 4, 4])
    )


def test_reads_the_tiny_config():
    cfg = qwen3_vl_config_from_hf(_hf_config().to_dict())
    text, vision = cfg.text, cfg.vision
    assert (text.qk_norm, text.mrope_interleaved, text.mrope_section) == (True, True, (6, 5, 5))
    assert (text.head_dim, text.attention_bias, text.qkv_bias) == (32, False, False)
    assert vision.deepstack_visual_indexes == (0, 1, 3) and vision.grid_side == 4
    assert vision.hidden_act == "gelu_pytorch_tanh" and vision.rope_theta == 10000.0


def test_sharding_rules_name_real_parameters():
    """Every tower rule matches a parameter with as many dimensions (the decoder's table
    also names biases Qwen3 does not have)."""
    import re

    from zspa_jax.sharding import plan_params

    cfg = qwen3_vl_config_from_hf(_hf_config().to_dict())
    shapes = {
        path: tuple(leaf.shape)
        for path, leaf in flatten(param_template(cfg, Qwen3VLForConditionalGeneration)).items()
    }
    rules = Qwen3VLForConditionalGeneration.SHARDING_RULES
    plan = plan_params(shapes, rules, {"data": 1, "model": 2})
    for pattern, _ in rules:
        if pattern.startswith("language_model"):
            continue
        assert any(re.fullmatch(pattern, path) for path in shapes), pattern
    specs = {path: tuple(spec) for path, spec in plan.specs.items()}
    assert specs["visual.deepstack_merger_list.2.linear_fc1.kernel"] == (None, "model")
    assert specs["language_model.model.layers.0.self_attn.q_norm.scale"] == ()
