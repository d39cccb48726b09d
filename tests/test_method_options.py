"""Method options: the `Option` records on each method, `PruneConfig(options=)`,
`select_tokens(options=)`, the lmms-eval model arguments and `zspa_jax.estimate`, all
driven by the one schema; DART's pivot counts and VisionZip's contextual share through the
model against the eager torch references run with the same values."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import zspa_jax
from tests.support.torch_reference_dart import hf_llava_dart_kept
from tests.support.torch_reference_pruning import select_tokens_reference, visionzip_reference
from zspa_jax import estimate as est
from zspa_jax.demo import DEMO_MODEL_DIR
from zspa_jax.methods import METHODS, Option, OptionValues
from zspa_jax.methods.dart import dart_flops
from zspa_jax.methods.visionzip import split_counts
from zspa_jax.pruning import PruneConfig, select_tokens

KEEP = 6

# --------------------------------------------------------------------------- the schema


def test_every_option_is_well_formed_and_its_default_in_range():
    for method in METHODS.values():
        for option in method.options:
            assert option.check(option.default) == option.default, (method.name, option.name)
            assert option.help and option.official, (method.name, option.name)
            assert option.flag == "--" + option.name.replace("_", "-")
        if method.llm_layer:  # every in-LLM method runs at its own layer option
            assert not method.option("layer").select
    assert {o.name for o in METHODS["zspaprune"].options} == {"core_ratio"}
    assert not METHODS["relevance"].options and not METHODS["divprune"].options
    assert METHODS["fastv"].option("layer").default == 2
    dart = {o.name: o.default for o in METHODS["dart"].options}
    assert dart == {"layer": 2, "image_pivots": 4, "text_pivots": 4}  # official scripts
    assert METHODS["visionzip"].option("contextual_share").default == 10 / 64  # 54 + 10 of 64


def test_option_parses_text_with_its_type_and_range():
    core = METHODS["zspaprune"].option("core_ratio")
    assert core.parse("0.25") == 0.25 and core.parse("auto") == "auto" and core.parse(1) == 1.0
    assert isinstance(core.parse(1), float)
    layer = METHODS["fastv"].option("layer")
    assert layer.parse("3") == 3 and layer.parse(np.int64(3)) == 3
    for bad in ("3.5", "x", True, 3.0, 0, -1):
        with pytest.raises(ValueError, match="option layer must be an integer >= 1"):
            layer.parse(bad)
    for bad in ("nan", float("inf"), 1.5, -0.1, "sometimes", None):
        with pytest.raises(ValueError, match=r"core_ratio must be a number in \[0, 1\] or 'auto'"):
            core.parse(bad)
    with pytest.raises(ValueError, match="identifier"):
        Option(name="bad name", type=int, default=1, help="h", official="o")
    with pytest.raises(ValueError, match="must be an integer >= 1"):  # a default out of range
        Option(name="n", type=int, default=0, minimum=1, help="h", official="o")


def test_prune_config_holds_every_option_of_its_method():
    prune = PruneConfig(keep=8, method="dart", options={"image_pivots": 2})
    assert dict(prune.options) == {"layer": 2, "image_pivots": 2, "text_pivots": 4}
    assert list(prune.options) == ["layer", "image_pivots", "text_pivots"]  # the record's order
    assert isinstance(prune.options, OptionValues)
    with pytest.raises(TypeError):
        prune.options["layer"] = 3  # read-only
    # frozen, hashable, equal whichever way an option is spelled: a static jit argument
    same = PruneConfig(8, None, "dart", options={"image_pivots": 2, "layer": 2})
    assert prune == same and hash(prune) == hash(same)
    assert PruneConfig(keep=8, layer=3, method="fastv") == PruneConfig(
        keep=8, method="fastv", options={"layer": 3}
    )
    assert PruneConfig(keep=8) != PruneConfig(keep=8, core_ratio=0.5)
    assert PruneConfig(keep=8, core_ratio=1) == PruneConfig(keep=8, core_ratio=1.0)
    assert dataclasses.replace(prune, keep=4).options == prune.options
    f = jax.jit(lambda x, cfg: x * cfg.options["image_pivots"], static_argnums=1)
    assert int(f(jnp.ones(2), prune)[0]) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="dart", options={"pivots": 3}),
            r"method 'dart' has no option 'pivots' \(its options: layer, image_pivots, text_pivots\)",
        ),
        (
            dict(method="dart", options={"image_pivots": -1}),
            r"method 'dart': option image_pivots must be an integer >= 0, got -1 \(its options: "
            r"layer, image_pivots, text_pivots\)",
        ),
        (
            dict(method="visionzip", options={"contextual_share": 1.5}),
            r"method 'visionzip': option contextual_share must be a number in \[0, 1\]",
        ),
        (
            dict(method="divprune", core_ratio=0.5),
            r"core_ratio=0.5: method 'divprune' has no core_ratio option \(it has none\); "
            r"methods with one: zspaprune",
        ),
        (
            dict(layer=2),
            r"layer=2: method 'zspaprune' has no layer option \(its options: core_ratio\); "
            r"methods with one: fastv, dart",
        ),
        (dict(layer=2, method="fastv", options={"layer": 3}), "option layer given twice"),
    ],
)
def test_bad_options_name_the_method_and_its_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(keep=8, **kwargs)
    with pytest.raises(TypeError, match="options must be a mapping"):
        PruneConfig(keep=8, options=[("core_ratio", 0.5)])


def test_select_tokens_options_are_the_core_ratio_shorthand():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2, 24, 8)).astype(np.float32)
    p = rng.standard_normal((2, 5, 8)).astype(np.float32)
    args = (jnp.asarray(v), jnp.asarray(p))
    for r in (0.0, 0.5, 1.0, "auto"):
        by_option = np.asarray(select_tokens(*args, keep=KEEP, options={"core_ratio": r}))
        assert np.array_equal(by_option, np.asarray(select_tokens(*args, keep=KEEP, core_ratio=r)))
    half = np.asarray(select_tokens(*args, keep=KEEP, options={"core_ratio": 0.5}))
    ref = select_tokens_reference(torch.as_tensor(v), torch.as_tensor(p), None, keep=KEEP)
    assert not np.array_equal(half, ref.numpy())  # the default 0.6 chooses otherwise here
    ref = select_tokens_reference(
        torch.as_tensor(v), torch.as_tensor(p), None, keep=KEEP, core_ratio=0.5
    )
    np.testing.assert_array_equal(half, ref.numpy())
    with pytest.raises(ValueError, match="method 'relevance' has no option 'core_ratio'"):
        select_tokens(*args, keep=KEEP, method="relevance", options={"core_ratio": 0.5})


def test_select_receives_only_its_methods_options():
    assert METHODS["zspaprune"].select_options(PruneConfig(keep=4).options) == {"core_ratio": 0.6}
    assert METHODS["dart"].select_options(PruneConfig(keep=4, method="dart").options) == {
        "image_pivots": 4,
        "text_pivots": 4,
    }  # the layer is the pipeline's
    assert METHODS["cdpruner"].select_options(PruneConfig(keep=4, method="cdpruner").options) == {}


# --------------------------------------------------------------------------- estimate, lmms-eval


def test_estimate_reads_the_options_of_its_prune_config():
    cfg = est.llava_1_5_7b_config()
    t = cfg.text
    base = est.estimate(cfg, 60, PruneConfig(keep=64, method="dart"))
    fewer = est.estimate(cfg, 60, PruneConfig(keep=64, method="dart", options={"image_pivots": 1}))
    assert base["pruning_flops"] == dart_flops(576, t.hidden_size, 64, 60)
    assert fewer["pruning_flops"] == dart_flops(576, t.hidden_size, 64, 60, num_image_pivots=1)
    deeper = est.estimate(cfg, 60, PruneConfig(keep=64, method="dart", layer=8))
    assert deeper["llm_prefill_flops"] == est.fastv_prefill_flops(t, 60, 576, 64, 8)
    assert deeper["llm_prefill_flops"] > base["llm_prefill_flops"]
    with pytest.raises(ValueError, match="'dart': layer K=32 is outside the decoder"):
        est.estimate(cfg, 60, PruneConfig(keep=64, method="dart", layer=32))
    with pytest.raises(TypeError, match="prune must be a zspa_jax.PruneConfig"):
        est.estimate(cfg, 60, 64)
    vz = est.llava_v1_6_7b_config()
    head = vz.vision.hidden_size // vz.vision.num_attention_heads
    r = est.estimate_model(
        vz,
        60,
        (336, 336),
        PruneConfig(keep=64, method="visionzip", options={"contextual_share": 0.5}),
    )
    per_crop = est.method_flops(
        "visionzip", 576, vz.vision.hidden_size, 64, 60, {"contextual_share": 0.5}, key_dim=head
    )
    assert r["pruning_flops"] == r["crops"] * per_crop
    assert per_crop != est.method_flops(
        "visionzip", 576, vz.vision.hidden_size, 64, 60, key_dim=head
    )


def test_estimate_cli_builds_its_prune_config_from_the_method_flags(capsys):
    import json

    from zspa_jax.estimate.cli import main

    assert (
        main(["--json", "--method", "dart", "--keep", "64", "--layer", "3", "--image-pivots", "2"])
        == 0
    )
    (row,) = json.loads(capsys.readouterr().out)
    prune = PruneConfig(keep=64, method="dart", options={"layer": 3, "image_pivots": 2})
    assert row == est.estimate(est.llava_1_5_7b_config(), 60, prune)
    assert main(["--json", "--ratio", "0.25", "--option", "core_ratio=auto"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == est.estimate(
        est.llava_1_5_7b_config(), 60, PruneConfig(ratio=0.25, core_ratio="auto")
    )
    for argv, message in [
        (["--keep", "64", "--layer", "3"], "method 'zspaprune' has no option 'layer'"),
        (
            ["--keep", "64", "--method", "dart", "--layer", "32"],
            "layer K=32 is outside the decoder",
        ),
        (["--keep", "64", "--option", "layer"], "--option takes NAME=VALUE"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_lmms_eval_model_args_are_the_chosen_methods_options():
    from zspa_jax.eval.args import parse_model_args

    demo = str(DEMO_MODEL_DIR)
    args = parse_model_args(
        {"pretrained": demo, "keep": 8, "method": "dart", "layer": "1", "image_pivots": 2}
    )
    assert args.prune == PruneConfig(keep=8, method="dart", options={"layer": 1, "image_pivots": 2})
    args = parse_model_args(
        {"pretrained": demo, "keep": 8, "contextual_share": "0.5", "method": "visionzip"}
    )
    assert args.prune.options["contextual_share"] == 0.5
    for kwargs, message in [
        ({"keep": 8, "core_ratio": "auto"}, None),
        (
            {"keep": 8, "layer": 1},
            "method 'zspaprune' has no option 'layer' (its options: core_ratio)",
        ),
        (
            {"keep": 8, "method": "dart", "text_pivots": "two"},
            "option text_pivots must be an integer >= 0",
        ),
        (
            {"keep": 8, "method": "visionzip", "contextual_share": 2},
            "contextual_share must be a number in [0, 1]",
        ),
        ({"image_pivots": 2}, "image_pivots configure pruning, which needs keep or ratio"),
    ]:
        if message is None:
            assert (
                parse_model_args({"pretrained": demo, **kwargs}).prune.options["core_ratio"]
                == "auto"
            )
            continue
        with pytest.raises(ValueError, match="zspa_jax model_args: .*" + re.escape(message)):
            parse_model_args({"pretrained": demo, **kwargs})


@pytest.mark.slow
def test_lmms_eval_checks_the_layer_against_the_model():
    from zspa_jax.eval.args import parse_model_args
    from zspa_jax.eval.runner import load_model

    demo = str(DEMO_MODEL_DIR)  # a 2-layer decoder: K must be 1
    with pytest.raises(ValueError, match="model_args: method 'fastv': layer K=2 is outside"):
        load_model(parse_model_args({"pretrained": demo, "keep": 8, "method": "fastv"}))


# --------------------------------------------------------------------------- through the model


@pytest.fixture(scope="module")
def tiny(tiny_hf_llava):
    return tiny_hf_llava("methods", text_layers=3)


@pytest.fixture(scope="module")
def vlm(tiny, converted):
    return zspa_jax.load(converted(tiny.path))


def _prompt(tiny, n_before: int, n_question: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(10, 290, size=n)  # noqa: E731
    image = np.full(tiny.tokens_per_image, tiny.image_token_index)
    return np.concatenate([[tiny.bos_token_id], text(n_before), image, text(n_question)]).astype(
        np.int64
    )


def _pixels(tiny, seed: int) -> np.ndarray:
    shape = (1, 3, tiny.image_size, tiny.image_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_dart_pivot_options_change_the_selection_as_the_reference_says(tiny, vlm):
    ids = _prompt(tiny, 3, 9, seed=21)[None]
    px = _pixels(tiny, seed=21)
    layer = 2
    default = PruneConfig(keep=KEEP, method="dart", layer=layer)
    _, kept_default = zspa_jax.forward(vlm, ids, px, prune=default, return_kept=True)
    np.testing.assert_array_equal(kept_default, hf_llava_dart_kept(tiny, ids, px, layer, KEEP))
    for pivots in ({"image_pivots": 1, "text_pivots": 2}, {"image_pivots": 0, "text_pivots": 1}):
        prune = PruneConfig(keep=KEEP, method="dart", layer=layer, options=pivots)
        _, kept = zspa_jax.forward(vlm, ids, px, prune=prune, return_kept=True)
        ref = hf_llava_dart_kept(
            tiny,
            ids,
            px,
            layer,
            KEEP,
            num_image_pivots=pivots["image_pivots"],
            num_text_pivots=pivots["text_pivots"],
        )
        np.testing.assert_array_equal(kept, ref, err_msg=str(pivots))
        assert not np.array_equal(kept, kept_default), pivots  # the option matters here


def _hf_tower(tiny, px: np.ndarray):
    """HF tower internals at the feature layer: hidden state, [CLS] row and keys (head means)."""
    tower = tiny.hf.model.vision_tower
    layer = tiny.options["vision_feature_layer"] % (tiny.options["vision_layers"] + 1) - 1
    captured = {}
    k_proj = tower.encoder.layers[layer].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    try:
        with torch.no_grad():
            out = tower(
                pixel_values=torch.as_tensor(px), output_attentions=True, output_hidden_states=True
            )
    finally:
        handle.remove()
    k = captured["k"]
    keys = k.view(k.shape[0], k.shape[1], tower.config.num_attention_heads, -1).mean(2)
    return out.hidden_states[layer + 1], out.attentions[layer][:, :, 0, :].mean(1), keys


def test_visionzip_contextual_share_changes_the_selection_as_the_reference_says(tiny, vlm):
    ids = _prompt(tiny, 2, 6, seed=22)[None]
    px = _pixels(tiny, seed=22)
    hidden, row, keys = _hf_tower(tiny, px)
    keep = 8
    chosen = {}
    for share in (10 / 64, 0.5, 0.0):
        prune = PruneConfig(keep=keep, method="visionzip", options={"contextual_share": share})
        logits, slots = zspa_jax.forward(vlm, ids, px, prune=prune, return_kept=True)
        tokens, ref_slots = visionzip_reference(
            hidden, row, keys, keep=keep, contextual_share=share
        )
        np.testing.assert_array_equal(slots, ref_slots.numpy(), err_msg=f"share {share}")
        chosen[share] = slots
        with torch.no_grad():  # and the merged tokens: the logits of transformers fed them
            visual = tiny.hf.model.multi_modal_projector(tokens)[0]
            start = int(np.flatnonzero(ids[0] == tiny.image_token_index)[0])
            embeds = tiny.hf.get_input_embeddings()(
                torch.as_tensor(np.where(ids[0] == tiny.image_token_index, 0, ids[0]))
            )
            pruned = torch.cat([embeds[:start], visual, embeds[start + tiny.tokens_per_image :]])[
                None
            ]
            hf = tiny.hf(inputs_embeds=pruned).logits.numpy()
        assert np.abs(logits - hf).max() <= 1e-4, share
    # the share changes which tokens stand for the image (7 + 1, 4 + 4, 8 + 0)
    assert [split_counts(keep, s) for s in chosen] == [(7, 1), (4, 4), (8, 0)]
    assert not np.array_equal(chosen[10 / 64], chosen[0.5])
    assert not np.array_equal(chosen[0.5], chosen[0.0])


def test_readme_tables_the_options_of_the_records():
    from pathlib import Path

    from zspa_jax.prune_args import options_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert options_table() in readme  # regenerate the table when an option changes
