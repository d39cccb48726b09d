"""VisPruner and VisionZip on LLaVA-NeXT: every crop (base view included) keeps K tokens by its
own [CLS] attention, laid out as the official LLaVA-NeXT code does (tests/support/torch_reference_anyres.py),
against eager PyTorch on transformers' own CLIP outputs: which tokens, in which order, at which
slots, and the pruned logits of transformers fed those tokens' embeddings. Batches hold images
of different crop grids (padding crops masked out) and rows of two images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zspa_jax
from tests.support.tiny_llava_next import hf_slot_of, rows, tiny_llava_next
from tests.support.torch_reference_anyres import visionzip_anyres, vispruner_anyres
from zspa_jax.families.llava_next.layout import (
    anyres_grid_shape,
    image_num_patches,
    image_token_count,
)

pytestmark = pytest.mark.slow  # a tiny transformers model and several programs

BOUND = 1e-4  # pruned-logit bound of the other pruned parity tests
KEEP = 6  # of each crop's 16 tokens (VisionZip: 5 dominant incl. [CLS] + 1 contextual)
# (40, 70) and (60, 60): 2x2 crop grids, the first unpadded to 4 of 8 rows; (32, 32): 1x2,
# unpadded to 4 of 8 columns; (64, 30): 2x1. A bucket holds 5 crops, so 1x2 and 2x1 images
# leave 2 padding crops.
ONE_PER_ROW = [(3, [(40, 70)], 6), (1, [(32, 32)], 4)]
TWO_PER_ROW = [(2, [(40, 70), (64, 30)], 5), (1, [(32, 32), (60, 60)], 7)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def vlm(tiny):
    return zspa_jax.load(tiny.out)


def _hf_tower(tiny, crops: np.ndarray):
    """transformers' CLIP tower of the LLaVA-NeXT model on crops [k, 3, S, S] at the feature
    layer: hidden [k, 1 + P, Dv], the [CLS] row (head mean) [k, 1 + P], head-mean keys."""
    tower = tiny.hf.model.vision_tower
    n_states = tower.config.num_hidden_layers + 1
    layer = tiny.hf.config.vision_feature_layer % n_states - 1  # the encoder layer that produces it
    captured = {}
    encoder = getattr(tower, "vision_model", tower).encoder
    handle = encoder.layers[layer].self_attn.k_proj.register_forward_hook(
        lambda m, i, o: captured.setdefault("k", o)
    )
    try:
        with torch.no_grad():
            out = tower(
                pixel_values=torch.as_tensor(crops),
                output_attentions=True,
                output_hidden_states=True,
            )
    finally:
        handle.remove()
    k = captured["k"]
    keys = k.view(k.shape[0], k.shape[1], tower.config.num_attention_heads, -1).mean(2)
    return out.hidden_states[layer + 1], out.attentions[layer][:, :, 0, :].mean(1), keys


def _reference(tiny, batch: dict, method: str, keep: int):
    """Per image: (projected tokens [T, D] in sequence order, their slots within the image)."""
    sizes, pixels = batch["image_sizes"], batch["pixel_values"]
    side = tiny.cfg.tokens_per_side
    out = []
    for i, size in enumerate(sizes):
        size = tuple(int(v) for v in size)
        k = image_num_patches(size, tiny.cfg)
        hidden, row, keys = _hf_tower(tiny, pixels[i, :k])
        grid = anyres_grid_shape(size, tiny.cfg.image_grid_pinpoints, tiny.cfg.crop_size)
        if method == "vispruner":
            tokens, sources = vispruner_anyres(
                hidden[:, 1:], row[:, 1:], keep=keep, grid=grid, side=side
            )
        else:
            tokens, sources = visionzip_anyres(hidden, row, keys, keep=keep, grid=grid, side=side)
        with torch.no_grad():
            projected = tiny.hf.model.multi_modal_projector(tokens)
        slot = hf_slot_of(tiny, size)
        out.append((projected, np.array([slot(int(c), int(t)) for c, t in sources])))
    return out


def _hf_row_logits(
    tiny, batch: dict, row: int, sizes: list, images: list, keep_positions: bool
) -> np.ndarray:
    """transformers on one row alone whose image spans (images of `sizes`) are replaced by
    `images` (their (tokens, slots) pairs), positions renumbered or the original ones of the slots."""
    ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
    real = np.flatnonzero(mask)
    with torch.no_grad():
        text = tiny.hf.get_input_embeddings()(
            torch.as_tensor(np.where(ids == tiny.image_token, 0, ids))
        )
    pieces, positions, image, at = [], [], 0, 0
    placeholders = real[ids[real] == tiny.image_token]
    for p in real:
        if ids[p] != tiny.image_token:
            pieces.append(text[p][None])
            positions.append([p])
            continue
        if at == 0:  # the image's first placeholder: all its kept tokens
            tokens, slots = images[image]
            first = np.searchsorted(placeholders, p)
            pieces.append(tokens)
            positions.append(placeholders[first + slots])
        at += 1
        if at == image_token_count(sizes[image], tiny.cfg):
            image, at = image + 1, 0
    embeds = torch.cat(pieces)[None]
    pos = (
        np.searchsorted(real, np.concatenate(positions))
        if keep_positions
        else np.arange(embeds.shape[1])
    )
    with torch.no_grad():
        return (
            tiny.hf(inputs_embeds=embeds, position_ids=torch.as_tensor(pos)[None]).logits[0].numpy()
        )


def _check(tiny, vlm, plan, method: str, keep_positions: bool, parity_record, budget: str = "row"):
    b = rows(tiny, plan, seed=21)
    ids, mask, pixels, sizes = (
        b["input_ids"],
        b["attention_mask"],
        b["pixel_values"],
        b["image_sizes"],
    )
    prune = zspa_jax.PruneConfig(keep=KEEP, method=method, budget=budget)
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        ids,
        pixels,
        mask,
        prune,
        image_sizes=sizes,
        keep_positions=keep_positions,
        return_kept=True,
        return_mask=True,
    )
    ref = _reference(tiny, b, method, KEEP)
    crops = pixels.shape[1]
    first = 0
    for row, (_, images, _) in enumerate(plan):
        mine = ref[first : first + len(images)]
        first += len(images)
        # kept: the slot of each entry, images after each other, then the padding crops' entries (-1).
        offsets = np.cumsum([0] + [image_token_count(s, tiny.cfg) for s in images])[:-1]
        expect = np.concatenate([off + slots for off, (_, slots) in zip(offsets, mine)])
        masked = len(images) * crops * KEEP - len(expect)
        np.testing.assert_array_equal(
            kept[row], np.concatenate([expect, np.full(masked, -1)]), err_msg=f"{method} row {row}"
        )
        assert out_mask[row].sum() == mask[row].sum() - sum(
            image_token_count(s, tiny.cfg) for s in images
        ) + len(expect)
        hf = _hf_row_logits(tiny, b, row, images, mine, keep_positions)
        d = parity_record(
            "LLaVA-NeXT [CLS]-method pruned logits",
            f"{method} {budget} {keep_positions=} row {row}",
            float(np.abs(logits[row][out_mask[row].astype(bool)] - hf).max()),
            BOUND,
        )
        assert d <= BOUND


@pytest.mark.parametrize("keep_positions", [False, True], ids=["renumbered", "original_positions"])
@pytest.mark.parametrize("method", ["vispruner", "visionzip"])
def test_two_sizes_one_image_per_row(tiny, vlm, method, keep_positions, parity_record):
    _check(tiny, vlm, ONE_PER_ROW, method, keep_positions, parity_record)


@pytest.mark.parametrize("method", ["vispruner", "visionzip"])
def test_two_images_per_row(tiny, vlm, method, parity_record):
    _check(tiny, vlm, TWO_PER_ROW, method, False, parity_record, budget="image")


def test_budget_is_per_crop_and_refusals_name_the_argument(tiny, vlm):
    """K is per crop (base view included): an image of c crops keeps c * K; a ratio is of a
    crop's P tokens; a keep above P, rows of different image counts and several images under
    budget="row" are refused by name."""
    b = rows(tiny, [(2, [(60, 60)], 4)], seed=22)  # 5 crops, nothing padded
    p = tiny.cfg.tokens_per_crop
    for prune, per_crop in (
        (zspa_jax.PruneConfig(keep=3, method="vispruner"), 3),
        (zspa_jax.PruneConfig(ratio=0.25, method="visionzip"), p // 4),
    ):
        res = zspa_jax.generate(vlm, **b, max_new_tokens=2, prune=prune)
        assert res.kept_indices.shape == (1, 5 * per_crop) and (res.kept_indices >= 0).all()
        assert res.stats["visual_tokens_kept_per_row"] == 5 * per_crop
    with pytest.raises(
        ValueError, match=rf"PruneConfig.keep={p + 1} exceeds the {p} tokens of one crop"
    ):
        zspa_jax.forward(vlm, **b, prune=zspa_jax.PruneConfig(keep=p + 1, method="visionzip"))
    two = rows(tiny, [(2, [(60, 60), (32, 32)], 4)], seed=23)
    with pytest.raises(ValueError, match="use PruneConfig\\(budget='image'\\)"):
        zspa_jax.forward(vlm, **two, prune=zspa_jax.PruneConfig(keep=3, method="vispruner"))
    for plan, budget in (
        ([(2, [(60, 60), (32, 32)], 4), (1, [(40, 70)], 3)], "image"),
        ([(2, [(60, 60)], 4), (1, [], 3)], "row"),
    ):
        mixed = rows(tiny, plan, seed=24)
        with pytest.raises(
            ValueError,
            match=r"method 'vispruner' prunes each crop of each image, so every prompt of "
            r"a batch must hold the same number of images, got \[\d, \d\]",
        ):
            zspa_jax.forward(
                vlm, **mixed, prune=zspa_jax.PruneConfig(keep=3, method="vispruner", budget=budget)
            )
