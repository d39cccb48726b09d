"""The method and family records: what the generic path reads instead of names.

Fast checks (no model): every method is one record whose capabilities drive validation,
select_tokens and each family's support decision; every family is one record that loading
finds by the name its checkpoint records.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zspa_jax
from models.checkpoint import CONFIG_NAME, FORMAT, CheckpointError
from zspa_jax.families import FAMILIES, family_of, get_family, read_config
from zspa_jax.methods import METHODS, get_method
from zspa_jax.methods.base import STAGES
from zspa_jax.pruning import PruneConfig, select_tokens


def test_every_method_is_one_record_and_a_prune_method():
    assert tuple(METHODS) == zspa_jax.PRUNE_METHODS
    for name, m in METHODS.items():
        assert m.name == name and m.stage in STAGES
        assert callable(m.select) and callable(m.flops) and m.summary
        options = m.resolve_options()  # flops reads the method's own options
        assert (
            m.flops(16, 8, 16, 4, key_dim=None, auto_zero_share=1.0, **options) == 0
        )  # keep == N: nothing to do
        assert m.flops(64, 8, 16, 4, key_dim=4, auto_zero_share=1.0, **options) >= 0
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("topk")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_select_tokens_serves_exactly_the_array_methods(name):
    """A method that reads only arrays runs in select_tokens; one that needs the LLM, a whole
    tower layer or merges tokens is refused, naming forward/generate."""
    m = METHODS[name]
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((2, 12, 8)), jnp.float32)
    p = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    kwargs = dict(keep=4, method=name, rng=jax.random.key(0), cls_attention=jnp.ones((2, 12)) / 12)
    if m.llm_layer or m.needs_tower or m.merges:
        with pytest.raises(ValueError, match=f"{name}.*PruneConfig"):
            select_tokens(v, p, **kwargs)
        return
    kept = np.asarray(select_tokens(v, p, **kwargs))
    assert (
        kept.shape == (2, 4)
        and (np.diff(kept, axis=1) > 0).all()
        and kept.min() >= 0
        and kept.max() < 12
    )
    if m.needs_prompt:
        with pytest.raises(ValueError, match=f"prompt.*required.*{name}"):
            select_tokens(v, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_family_support_follows_capabilities(family, name):
    f, m = FAMILIES[family], METHODS[name]
    refused = (
        (m.needs_cls_attention and not f.has_cls)
        or (m.needs_grid and not f.grid_tokens)
        # a [CLS] method runs on whole tower rows, which need no mask
        or (f.variable_tokens and not m.accepts_mask and not (m.needs_cls_attention and f.has_cls))
    )
    if refused:
        with pytest.raises(ValueError, match=f"method '{name}'.*{f.display_name}"):
            f.check_method(PruneConfig(keep=4, method=name))
    else:
        f.check_method(PruneConfig(keep=4, method=name))


def test_core_ratio_auto_needs_a_method_with_a_core():
    for name, m in METHODS.items():
        if m.option("core_ratio") is not None:
            prune = PruneConfig(keep=4, method=name, core_ratio="auto")
            assert prune.options["core_ratio"] == "auto"
        else:
            with pytest.raises(ValueError, match="no core_ratio option"):
                PruneConfig(keep=4, method=name, core_ratio="auto")


def test_layer_shorthand_is_the_layer_option():
    assert PruneConfig(keep=4, method="fastv", layer=3).options["layer"] == 3
    assert PruneConfig(keep=4, method="dart", layer=1) == PruneConfig(
        keep=4, method="dart", options={"layer": 1}
    )
    with pytest.raises(ValueError, match="option layer must be an integer"):
        PruneConfig(keep=4, method="fastv", layer=1.5)


def test_families_are_found_by_config_and_name():
    for name, f in FAMILIES.items():
        assert get_family(name) is f and f.sharding_rules
        assert f.converter.startswith("convert.")
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("llava_next_video")
    with pytest.raises(TypeError, match="not the config of a registered model family"):
        family_of(object())


def _write_payload(path, payload) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(payload))


def test_a_checkpoint_must_name_a_known_family(tmp_path):
    from zspa_jax.demo import DEMO_MODEL_DIR

    config = json.loads((DEMO_MODEL_DIR / CONFIG_NAME).read_text())["config"]
    assert type(read_config(DEMO_MODEL_DIR)).__name__ == "LlavaConfig"
    _write_payload(tmp_path / "nameless", {"format": FORMAT, "config": config})
    with pytest.raises(
        CheckpointError, match="does not name its model family.*re-run the converter"
    ):
        read_config(tmp_path / "nameless")
    _write_payload(
        tmp_path / "unknown", {"format": FORMAT, "model": "llava_next_video", "config": config}
    )
    with pytest.raises(
        CheckpointError, match="unknown model family 'llava_next_video'.*re-run the converter"
    ):
        read_config(tmp_path / "unknown")
    _write_payload(tmp_path / "wrong", {"format": FORMAT, "model": "qwen2_5_vl", "config": config})
    with pytest.raises(CheckpointError, match="invalid model config.*re-run the converter"):
        read_config(tmp_path / "wrong")
