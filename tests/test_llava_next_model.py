"""LLaVA-NeXT (anyres): models/llava_next.py and convert/llava_next.py against transformers.

A tiny random HF `LlavaNextForConditionalGeneration` (CLIP 32 px / patch 8 -> 4x4 tokens
per crop, 3 tower layers; 2-layer GQA LLaMA; pinpoints [[32, 64], [64, 32], [64, 64]]) is
saved with a `LlavaNextProcessor`, converted in-process by `convert.llava_next.convert`,
restored into our model and compared in float32 (matmul precision "highest", set in
conftest): placeholder counts, packed image features, merged input embeddings and the
logits of a left-padded batch whose two images have different sizes. Conversion failures
must leave nothing behind; bad inputs must be ValueErrors naming the argument.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.hf_config import UnsupportedConfigError
from convert.llava_next import (
    ConversionError,
    convert,
    llava_next_config_from_hf,
    map_key,
)
from models.checkpoint import (
    CONFIG_NAME,
    flatten,
    param_template,
    restore_model,
    with_dtype,
)
from models.llava_next import NEWLINE, LlavaNextConfig, LlavaNextForConditionalGeneration
from tests.support.paths import REPO_ROOT
from tests.support.tiny_llava_next import (
    IMAGE_SIZE,
    MAX_PATCHES,
    PATCH_SIZE,
    PINPOINTS,
    Built,
    build,
    hf_slot_of,
    random_pixels,
)
from tests.support.tokenizers import IMAGE_TOKEN
from zspa_jax.families.llava_next.layout import (
    anyres_grid_shape,
    anyres_layout,
    check_inputs,
    image_num_patches,
    image_token_count,
    select_best_resolution,
    unpadded_features_shape,
)

TOL = 1e-5
# (height, width): landscape, portrait, square, extreme strips, odd sizes, tiny and huge
SIZES = [
    (40, 70),
    (64, 30),
    (32, 32),
    (64, 64),
    (100, 20),
    (20, 100),
    (33, 97),
    (97, 33),
    (45, 45),
    (7, 300),
    (300, 7),
    (500, 499),
]


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("llava_next"))


def jitted(module: nnx.Module, method: str, traces: list | None = None):
    """`module.method` under plain jax.jit over the split state; appends to `traces` on every trace."""
    graphdef, state = nnx.split(module)

    def fn(state, *args):
        if traces is not None:
            traces.append(1)
        return getattr(nnx.merge(graphdef, state), method)(*args)

    compiled = jax.jit(fn)
    return lambda *args: compiled(state, *args)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def hf_features(tiny):
    """transformers' get_image_features pooler_output for every size of SIZES (one batch)."""
    pv = random_pixels(SIZES, tiny.cfg, seed=1)
    with torch.no_grad():
        out = tiny.hf.get_image_features(
            pixel_values=torch.from_numpy(pv), image_sizes=torch.tensor(SIZES)
        )
    return pv, [f.numpy() for f in out.pooler_output]


# --------------------------------------------------------------------------------------
# config and geometry
# --------------------------------------------------------------------------------------


def test_converted_config_matches_hf(tiny):
    cfg, hfc = tiny.cfg, tiny.hf.config
    assert cfg.image_grid_pinpoints == tuple(tuple(p) for p in hfc.image_grid_pinpoints)
    assert cfg.image_token_id == hfc.image_token_index == tiny.image_token
    assert cfg.feature_layers == (hfc.vision_feature_layer,)
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (IMAGE_SIZE, PATCH_SIZE)
    assert cfg.text.num_key_value_heads == hfc.text_config.num_key_value_heads
    assert cfg.max_patches == MAX_PATCHES
    assert LlavaNextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert tiny.summary["tensors"] == len(
        list(tiny.hf.state_dict())
    )  # every tensor, image_newline included
    np.testing.assert_array_equal(
        np.asarray(tiny.vlm.image_newline[...]), tiny.hf.model.image_newline.detach().numpy()
    )
    bf16 = param_template(with_dtype(cfg, "bfloat16"), LlavaNextForConditionalGeneration)
    assert bf16["image_newline"].dtype == jnp.bfloat16
    assert bf16["vision_tower"]["pre_layrnorm"]["scale"].dtype == jnp.bfloat16


def test_geometry_helpers_match_transformers(tiny):
    from transformers.image_processing_utils import select_best_resolution as hf_best
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    side = IMAGE_SIZE // PATCH_SIZE
    for size in SIZES:
        assert select_best_resolution(size, PINPOINTS) == tuple(hf_best(list(size), PINPOINTS)), (
            size
        )
        grid = anyres_grid_shape(size, PINPOINTS, IMAGE_SIZE)
        assert grid == tuple(get_anyres_image_grid_shape(list(size), PINPOINTS, IMAGE_SIZE)), size
        assert image_num_patches(size, tiny.cfg) == image_size_to_num_patches(
            list(size), PINPOINTS, IMAGE_SIZE
        )
        feature_map = torch.zeros(1, grid[0] * side, grid[1] * side)
        kept = unpadded_features_shape(size, grid, side)
        assert (kept.rows, kept.cols) == tuple(unpad_image(feature_map, list(size)).shape[1:]), size
    # the choice is not always the same pinpoint, and unpadding does cut rows and columns
    assert len({select_best_resolution(s, PINPOINTS) for s in SIZES}) == 3
    cut = [
        unpadded_features_shape(s, anyres_grid_shape(s, PINPOINTS, IMAGE_SIZE), side) for s in SIZES
    ]
    assert any(k.top > 0 for k in cut) and any(k.left > 0 for k in cut)


def test_image_token_count_matches_processor_and_model(tiny, hf_features):
    """(a) our count == the processor's placeholder count == the length of transformers'
    packed features, for portrait, landscape, square and extreme sizes."""
    counts = [image_token_count(s, tiny.cfg) for s in SIZES]
    processor_counts = tiny.processor._get_num_multimodal_tokens(
        image_sizes=[list(s) for s in SIZES]
    ).num_image_tokens
    assert counts == list(processor_counts)
    assert counts == [f.shape[0] for f in hf_features[1]]
    assert counts[:2] == [52, 56]
    assert len(set(counts)) >= 5  # the sizes really exercise different geometries


def test_image_token_count_matches_processor_expansion(tiny):
    """The processor run on real images writes exactly image_token_count placeholders and
    image_num_patches crops per image."""
    from PIL import Image

    rng = np.random.default_rng(3)
    sizes = [(40, 70), (64, 30), (45, 45), (20, 100)]
    for h, w in sizes:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        batch = tiny.processor(
            text=[f"look {IMAGE_TOKEN} here"], images=[image], return_tensors="np"
        )
        assert tuple(batch["image_sizes"][0]) == (h, w)
        assert int((batch["input_ids"] == tiny.image_token).sum()) == image_token_count(
            (h, w), tiny.cfg
        )
        assert batch["pixel_values"].shape[1] == image_num_patches((h, w), tiny.cfg)


def test_layout_rows(tiny):
    layout = anyres_layout(SIZES[:3], tiny.cfg, num_slots=80)
    assert layout.index.shape == layout.valid.shape == (3, 80) and layout.index.dtype == np.int32
    p = tiny.cfg.tokens_per_crop
    for row, size in enumerate(SIZES[:3]):
        n = image_token_count(size, tiny.cfg)
        assert layout.valid[row].tolist() == [True] * n + [False] * (80 - n)
        np.testing.assert_array_equal(
            layout.index[row, :p], np.arange(p)
        )  # the base view first, in order
        kept = unpadded_features_shape(size, anyres_grid_shape(size, PINPOINTS, IMAGE_SIZE), 4)
        newlines = np.flatnonzero(layout.index[row, :n] == NEWLINE)
        np.testing.assert_array_equal(
            newlines, p + np.arange(1, kept.rows + 1) * (kept.cols + 1) - 1
        )
        assert (
            layout.index[row, p:n][layout.index[row, p:n] != NEWLINE] >= p
        ).all()  # grid reads crops 1..


# --------------------------------------------------------------------------------------
# features, embeddings, logits vs transformers
# --------------------------------------------------------------------------------------


def test_packed_features_match_get_image_features(tiny, hf_features, parity_record):
    """(b) per image within 1e-5, for all SIZES in two batches of different sizes that share
    one compiled function (same num_images / num_patches / num_slots)."""
    pv, ref = hf_features
    traces: list = []
    fn = jitted(tiny.vlm, "packed_features", traces)
    slots = max(f.shape[0] for f in ref) + 3
    newline = np.asarray(tiny.vlm.image_newline[...])
    worst = 0.0
    half = len(SIZES) // 2
    for part in (slice(0, half), slice(half, None)):
        layout = anyres_layout(SIZES[part], tiny.cfg, num_slots=slots)
        ours = np.asarray(fn(jnp.asarray(pv[part]), layout))
        assert ours.shape == (half, slots, tiny.cfg.text.hidden_size)
        for row, r in enumerate(ref[part]):
            n = r.shape[0]
            worst = max(worst, max_diff(ours[row, :n], r))
            assert not ours[row, n:].any()  # padding slots are zero
            is_newline = layout.index[row, :n] == NEWLINE
            expected = np.broadcast_to(newline, (is_newline.sum(), newline.size))
            np.testing.assert_array_equal(ours[row, :n][is_newline], expected)
    parity_record("llava_next packed features", "tiny anyres 12 sizes", worst, TOL)
    assert worst <= TOL
    assert len(traces) == 1  # images of different sizes shared one compile


def _padded_batch(tiny):
    """Two prompts, images of different sizes, left-padded by the saved processor."""
    from PIL import Image

    rng = np.random.default_rng(11)
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 30, 3), dtype=np.uint8)),
    ]
    prompts = [
        f"USER: {IMAGE_TOKEN}\nWhat is shown in this image? ASSISTANT:",
        (
            f"USER: Describe the picture in detail. {IMAGE_TOKEN} There are two people walking along a sandy "
            "beach while the sun sets behind the hills. ASSISTANT:"
        ),
    ]
    batch = tiny.processor(text=prompts, images=images, return_tensors="np", padding=True)
    return {k: np.asarray(v) for k, v in batch.items()}


def test_left_padded_batch_logits(tiny, parity_record):
    """(c) left-padded batch of 2 prompts whose images differ in size: merged embeddings and
    logits (real positions) within 1e-5 of transformers given the same positions."""
    b = _padded_batch(tiny)
    ids, mask, pv, sizes = b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_sizes"]
    assert (mask == 0).any() and (mask[:, -1] == 1).all()  # really left-padded
    assert pv.shape[1] == MAX_PATCHES and not pv[1, image_num_patches(sizes[1], tiny.cfg) :].any()
    check_inputs(tiny.cfg, pv, sizes, ids)
    layout = anyres_layout(sizes, tiny.cfg, input_ids=ids, attention_mask=mask)

    def run(model, input_ids, pixel_values, attention_mask, aux):
        inputs = model.multimodal_inputs(input_ids, pixel_values, attention_mask, aux)
        return model(input_ids, pixel_values, attention_mask, aux), inputs

    graphdef, state = nnx.split(tiny.vlm)
    logits, inputs = jax.jit(lambda s, *a: run(nnx.merge(graphdef, s), *a))(
        state, jnp.asarray(ids, jnp.int32), jnp.asarray(pv), jnp.asarray(mask, jnp.int32), layout
    )
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and logits.shape == (*ids.shape, tiny.cfg.text.vocab_size)

    position_ids = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    t = torch.as_tensor
    with torch.no_grad():
        ref = tiny.hf(
            input_ids=t(ids).long(),
            pixel_values=t(pv),
            image_sizes=t(sizes),
            attention_mask=t(mask).long(),
            position_ids=t(position_ids).long(),
        ).logits.numpy()
        feats = torch.cat(
            tiny.hf.get_image_features(pixel_values=t(pv), image_sizes=t(sizes)).pooler_output
        )
        ids_t = t(ids).long()
        embeds = tiny.hf.get_input_embeddings()(ids_t)
        ref_embeds = embeds.masked_scatter((ids_t == tiny.image_token)[..., None], feats).numpy()

    real = mask.astype(bool)
    d_embeds = max_diff(np.asarray(inputs.embeds)[real], ref_embeds[real])
    d_logits = max_diff(logits[real], ref[real])
    scale = float(np.abs(ref[real]).max())
    parity_record("llava_next merged embeds", "tiny, left-padded 2 sizes", d_embeds, TOL)
    parity_record("llava_next logits", "tiny, left-padded 2 sizes", d_logits, TOL, scale=scale)
    assert d_embeds <= TOL and d_logits <= TOL
    assert scale > 1.0  # logits large enough that a 1e-5 bound means something

    # the protocol fields: each row's placeholders in sequence order = that row's image
    np.testing.assert_array_equal(np.asarray(inputs.positions), position_ids)
    assert inputs.next_position is None and inputs.image_grid is None
    counts = [image_token_count(s, tiny.cfg) for s in sizes]
    visual, valid = np.asarray(inputs.visual), np.asarray(inputs.visual_valid)
    assert visual.shape == (2, max(counts), tiny.cfg.text.hidden_size)
    assert valid.sum(1).tolist() == counts and (valid[:, :1]).all()
    start = 0
    for row, n in enumerate(counts):
        assert max_diff(visual[row, :n], feats[start : start + n].numpy()) <= TOL
        assert not visual[row, n:].any()
        expected = np.r_[np.arange(n), np.full(max(counts) - n, -1)]
        np.testing.assert_array_equal(np.asarray(inputs.image_index)[row, 0], expected)
        start += n
    text_rows = ~(ids == tiny.image_token) & real
    np.testing.assert_array_equal(
        np.asarray(inputs.embeds)[text_rows], np.asarray(inputs.text_embeds)[text_rows]
    )


def test_row_layout_with_two_images_in_a_row_and_masked_placeholders(tiny):
    """The visual layout for a row holding two images and a row whose placeholders were
    padded with masked ones (what zspa_jax.host.pad_visual_slots makes): row slots
    in sequence order, masked placeholders never real, images in reading order."""
    cfg, tok = tiny.cfg, tiny.cfg.image_token_index
    sizes = [(40, 70), (64, 30), (45, 45)]
    a, b, c = (image_token_count(s, cfg) for s in sizes)
    row0 = [5] + [tok] * a + [6, 7] + [tok] * b + [8]
    row1 = (
        [9] * (len(row0) - c - 3) + [tok] * c + [tok, tok, 10]
    )  # 2 masked placeholders after the image
    ids = np.array([row0, row1])
    mask = np.ones_like(ids)
    mask[1, len(row1) - 3 : len(row1) - 1] = (
        0  # (not left padding: only the layout is checked here)
    )
    layout = anyres_layout(sizes, cfg, input_ids=ids, attention_mask=mask)
    s = layout.index.shape[1]
    assert layout.row_index.shape == (2, a + b) and layout.image_index.shape == (2, 2, s)
    np.testing.assert_array_equal(layout.row_index[0], np.r_[np.arange(a), s + np.arange(b)])
    np.testing.assert_array_equal(
        layout.row_index[1], np.r_[2 * s + np.arange(c), np.full(a + b - c, -1)]
    )
    np.testing.assert_array_equal(layout.image_index[0, 1, :b], a + np.arange(b))
    assert (layout.image_index[1, 1] == -1).all() and (
        layout.image_index[1, 0, :c] == np.arange(c)
    ).all()
    with pytest.raises(
        ValueError, match=r"^input_ids row 0: image 1 needs 56 image tokens but the row has only 55"
    ):
        # one placeholder moved from row 0 to row 1: the total matches, the rows do not
        anyres_layout(
            sizes,
            cfg,
            input_ids=np.array([row0[:-2] + [8, 8], [tok] + row1[1:]]),
            attention_mask=mask,
        )


def test_per_crop_tower_layout_matches_transformers_packing(tiny):
    """Each tower token's row slot (the layout the per-crop methods write kept tokens to):
    where transformers' own pack_image_features puts that token (newline slots ending every
    row of the unpadded crop grid), or for a token unpadding cuts away the nearest kept
    token's. Host-side only: images whose unpadding cuts rows, columns or neither, two of
    them in one row after text."""
    cfg, tok = tiny.cfg, tiny.cfg.image_token_index
    sizes = [(40, 70), (64, 30), (33, 97), (45, 45)]
    counts = [image_token_count(s, cfg) for s in sizes]
    row0 = [5, 6] + [tok] * counts[0] + [7] + [tok] * counts[1] + [8]
    row1 = [9] + [tok] * counts[2] + [tok] * counts[3] + [10, 11]
    width = max(len(row0), len(row1))
    ids = np.array([[0] * (width - len(r)) + r for r in (row0, row1)])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in (row0, row1)])
    layout = anyres_layout(sizes, cfg, input_ids=ids, attention_mask=mask)
    first = [int(layout.image_index[b, i, 0]) for b in range(2) for i in range(2)]
    for m, size in enumerate(sizes):
        slot = hf_slot_of(tiny, size)
        crops = image_num_patches(size, cfg)
        expect = np.array([[slot(c, t) for t in range(cfg.tokens_per_crop)] for c in range(crops)])
        np.testing.assert_array_equal(
            layout.tower_slot[m, :crops] - first[m], expect, err_msg=f"image {m} {size}"
        )
        assert (layout.tower_slot[m, crops:] == -1).all()


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(tiny):
    """(d) host checks and the model's own shape checks are ValueErrors naming the argument."""
    cfg = tiny.cfg
    sizes = np.array([[40, 70], [64, 30]])
    pv = np.zeros((2, MAX_PATCHES, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    ids = np.full((1, 52 + 56), cfg.image_token_index)
    check_inputs(cfg, pv, sizes, ids)  # the good case passes

    with pytest.raises(ValueError, match=r"^pixel_values must be .*got shape \(2, 3, 32, 32\)"):
        check_inputs(cfg, pv[:, 0], sizes)
    with pytest.raises(ValueError, match=r"^pixel_values must be"):
        check_inputs(cfg, np.zeros((2, 5, 3, 16, 16), np.float32), sizes)
    with pytest.raises(
        ValueError, match=r"^image_sizes holds 3 image size\(s\) but pixel_values holds 2"
    ):
        check_inputs(cfg, pv, np.array([[40, 70], [64, 30], [32, 32]]))
    with pytest.raises(
        ValueError, match=r"^image_sizes\[0\] = \(40, 70\) needs 5 crops .* pixel_values has 3"
    ):
        check_inputs(cfg, pv[:, :3], sizes)
    with pytest.raises(ValueError, match=r"^image_sizes must be an int array \[num_images, 2\]"):
        check_inputs(cfg, pv, np.array([40, 70, 64, 30]))
    with pytest.raises(ValueError, match=r"^image_sizes\[1\] must be positive"):
        check_inputs(cfg, pv, np.array([[40, 70], [0, 30]]))
    with pytest.raises(ValueError, match=r"^input_ids holds 107 image tokens .* need 108"):
        check_inputs(cfg, pv, sizes, ids[:, 1:])
    with pytest.raises(ValueError, match=r"^num_slots=50 is too small"):
        anyres_layout(sizes, cfg, num_slots=50)

    layout = anyres_layout(sizes, cfg)
    with pytest.raises(
        ValueError, match=r"^pixel_values must be \[num_images, num_patches, 3, 32, 32\]"
    ):
        tiny.vlm.packed_features(jnp.zeros((2, 3, 32, 32)), layout)
    with pytest.raises(
        ValueError, match=r"^layout .* must have one row per image of pixel_values \(1\)"
    ):
        tiny.vlm.packed_features(jnp.zeros((1, 5, 3, 32, 32)), layout)
    with pytest.raises(ValueError, match=r"image_sizes does not match pixel_values"):
        tiny.vlm.packed_features(jnp.zeros((2, 3, 3, 32, 32)), layout)
    with pytest.raises(ValueError, match=r"^aux must be the AnyresLayout"):
        tiny.vlm.multimodal_inputs(jnp.asarray(ids), jnp.asarray(pv), None, None)


# --------------------------------------------------------------------------------------
# converter: config allowlist, key table, failures, CLI
# --------------------------------------------------------------------------------------


def _hf_dict(tiny) -> dict:
    return json.loads(tiny.hf.config.to_json_string(use_diff=False))


@pytest.mark.parametrize(
    "edit, field",
    [
        (
            lambda c: c["text_config"].update(model_type="mistral", sliding_window=4096),
            "text_config.sliding_window=4096",
        ),
        (lambda c: c["text_config"].update(model_type="qwen2"), "text_config.model_type='qwen2'"),
        (
            lambda c: c.update(vision_feature_select_strategy="full"),
            "vision_feature_select_strategy='full'",
        ),
        (lambda c: c.update(image_grid_pinpoints=[[32, 48]]), "image_grid_pinpoints"),
        (lambda c: c.pop("image_grid_pinpoints"), "image_grid_pinpoints is missing"),
        (
            lambda c: c["text_config"].update(
                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
            ),
            "rope_type='yarn'",
        ),
        (
            lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
            "vision_config.model_type",
        ),
        (lambda c: c.update(mystery_field=1), "config.mystery_field=1"),
    ],
)
def test_unsupported_config_is_refused_by_name(tiny, edit, field):
    hf = _hf_dict(tiny)
    edit(hf)
    with pytest.raises(UnsupportedConfigError) as err:
        llava_next_config_from_hf(hf)
    assert field in str(err.value)


def test_config_reader_collects_every_problem_and_accepts_mistral_without_window(tiny):
    hf = _hf_dict(tiny)
    hf["text_config"].update(model_type="mistral", sliding_window=128)
    hf["vision_feature_select_strategy"] = "full"
    with pytest.raises(UnsupportedConfigError) as err:
        llava_next_config_from_hf(hf)
    assert "sliding_window=128" in str(
        err.value
    ) and "vision_feature_select_strategy='full'" in str(err.value)

    mistral = _hf_dict(tiny)
    mistral["text_config"].update(model_type="mistral", sliding_window=None)
    assert (
        llava_next_config_from_hf(mistral) == llava_next_config_from_hf(_hf_dict(tiny)) == tiny.cfg
    )
    with pytest.raises(UnsupportedConfigError, match="expected 'llava_next'"):
        llava_next_config_from_hf({**_hf_dict(tiny), "model_type": "llava"})
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full' is not supported"):
        dataclasses.replace(tiny.cfg, vision_feature_select_strategy="full")


def test_key_table_covers_every_layout(tiny):
    """Saved (v5), in-memory and legacy-hub names of every tensor map to the same parameter,
    and together they cover the model exactly."""
    from safetensors import safe_open

    with safe_open(str(tiny.src / "model.safetensors"), "np") as f:
        saved = sorted(f.keys())
    in_memory = sorted(tiny.hf.state_dict())
    assert "image_newline" in saved and "model.image_newline" in in_memory
    legacy = [
        k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if k.startswith("vision_tower.")
        else k
        for k in saved
    ]
    paths = {k: map_key(k) for k in saved}
    assert None not in paths.values()
    params = set(flatten(param_template(tiny.cfg, LlavaNextForConditionalGeneration)))
    assert {p for p, _ in paths.values()} == params and len(paths) == len(params)
    assert sorted(map_key(k) for k in legacy) == sorted(paths.values())
    assert sorted(map_key(k) for k in in_memory) == sorted(paths.values())
    assert (
        map_key("model.image_newline")[0] == "image_newline"
        and map_key("image_newline_extra") is None
    )


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_failed_conversion_leaves_nothing(tiny, tmp_path):
    """(e) a source without its weights file: ConversionError, and no OUT nor temp dir."""
    bad = tmp_path / "no_weights"
    shutil.copytree(tiny.src, bad)
    (bad / "model.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="no weights found"):
        convert(bad, out, progress=False)
    _assert_nothing_written(out)


def test_missing_and_unknown_tensors_are_reported_together(tiny, tmp_path):
    """The plan (names and shapes only, before anything is written) names a missing
    image_newline and an unknown tensor in one error."""
    from safetensors.numpy import load_file, save_file

    from convert import core
    from convert.llava_next import SPEC
    from convert.safetensors_io import SafetensorsCheckpoint

    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(tiny.src / "model.safetensors")
    newline = tensors.pop("image_newline")
    tensors["image_newline_v2"] = newline
    save_file(tensors, bad / "model.safetensors")
    template = param_template(tiny.cfg, LlavaNextForConditionalGeneration)
    with pytest.raises(ConversionError) as err:
        core.plan_conversion(SafetensorsCheckpoint(bad), template, SPEC)
    message = str(err.value)
    assert message.startswith("2 problem(s)")
    assert "parameter 'image_newline' (64,) has no tensor" in message
    assert "unexpected tensor 'image_newline_v2' (64,): no rule maps it" in message


def test_processor_is_saved_with_the_checkpoint(tiny):
    from transformers import AutoProcessor

    assert "processor_config.json" in tiny.summary["processor_files"]
    assert "tokenizer.json" in tiny.summary["processor_files"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = AutoProcessor.from_pretrained(tiny.out)
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert processor.image_processor.image_grid_pinpoints == PINPOINTS
    assert processor.image_token_id == tiny.cfg.image_token_id


def test_sharding_rules(tiny):
    from zspa_jax.sharding import plan_params

    template = flatten(param_template(tiny.cfg, LlavaNextForConditionalGeneration))
    shapes = {p: tuple(s.shape) for p, s in template.items()}
    plan = plan_params(
        shapes, LlavaNextForConditionalGeneration.SHARDING_RULES, {"data": 1, "model": 2}
    )
    assert tuple(plan.specs["image_newline"]) == (None,)
    assert tuple(plan.specs["language_model.model.layers.0.self_attn.q_proj.kernel"]) == (
        None,
        "model",
    )
    assert tuple(plan.specs["vision_tower.encoder.layers.0.mlp.fc2.kernel"]) == ("model", None)
    assert tuple(plan.specs["multi_modal_projector.linear_1.kernel"]) == (None, "model")
    assert not plan.replicated  # every split dimension divides model=2 at these widths


@pytest.mark.slow
def test_cli_subprocess(tiny, tmp_path):
    """`python -m convert.llava_next SRC OUT` writes the same checkpoint as the in-process call."""
    out = tmp_path / "cli_out"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "convert.llava_next", str(tiny.src), str(out), "--quiet"],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted 81 tensors" in proc.stdout
    assert json.loads((out / CONFIG_NAME).read_text())["model"] == "llava_next"
    cli = restore_model(out, tiny.cfg, LlavaNextForConditionalGeneration)
    a, b = (
        nnx.to_pure_dict(nnx.state(cli, nnx.Param)),
        nnx.to_pure_dict(nnx.state(tiny.vlm, nnx.Param)),
    )
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    again = subprocess.run(
        [sys.executable, "-m", "convert.llava_next", str(tiny.src), str(out), "--quiet"],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr


@pytest.mark.slow
def test_mistral_text_config_logits(tmp_path, parity_record):
    """llava-v1.6-mistral's layout: a Mistral language model without sliding window is the
    shared LLaMA decoder; logits within 1e-5 of transformers' MistralModel."""
    m = build(tmp_path, text="mistral", seed=5, with_processor=False)
    assert m.hf.config.text_config.model_type == "mistral"
    sizes = np.array([[64, 30]])
    pv = random_pixels([tuple(sizes[0])], m.cfg, seed=6)[:, :3]
    n = image_token_count(sizes[0], m.cfg)
    rng = np.random.default_rng(7)
    ids = np.concatenate(
        [[1], rng.integers(4, 300, 5), np.full(n, m.image_token), rng.integers(4, 300, 6)]
    )[None]
    check_inputs(m.cfg, pv, sizes, ids)
    ours = np.asarray(
        jitted(m.vlm, "__call__")(
            jnp.asarray(ids, jnp.int32),
            jnp.asarray(pv),
            jnp.ones(ids.shape, jnp.int32),
            anyres_layout(sizes, m.cfg),
        )
    )
    with torch.no_grad():
        ref = m.hf(
            input_ids=torch.as_tensor(ids).long(),
            pixel_values=torch.from_numpy(pv),
            image_sizes=torch.as_tensor(sizes),
        ).logits.numpy()
    d = max_diff(ours, ref)
    parity_record(
        "llava_next logits (mistral text)",
        "tiny, 1 image 64x30",
        d,
        TOL,
        scale=float(np.abs(ref).max()),
    )
    assert d <= TOL
