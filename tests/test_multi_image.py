"""Several images in one prompt (LLaVA-1.5): the row budget, the per-image budget, rows of
different image counts, strings + PIL lists, each against transformers.

A row's visual tokens are its placeholders in reading order (image 1's, then image 2's);
the references below run transformers on one row alone with the kept tokens' embeddings
(`inputs_embeds`) at renumbered or original positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zspa_jax
from tests.support.torch_reference_pruning import select_tokens_reference
from zspa_jax.pruning import PruneConfig

BOUND = 1e-4  # pruned-logit parity bound of the single-image tests (tests/test_generate.py)
KEEP = 6


@pytest.fixture(scope="module")
def tiny(tiny_hf_llava):
    return tiny_hf_llava("methods", text_layers=3)


@pytest.fixture(scope="module")
def vlm(tiny, converted):
    return zspa_jax.load(converted(tiny.path))


def _row(tiny, pieces, seed: int) -> np.ndarray:
    """BOS, then for each piece: an int = that many random text ids, "img" = one image's placeholders."""
    rng = np.random.default_rng(seed)
    parts = [[tiny.bos_token_id]]
    for piece in pieces:
        parts.append(
            np.full(tiny.tokens_per_image, tiny.image_token_index)
            if piece == "img"
            else rng.integers(10, 290, piece)
        )
    return np.concatenate(parts).astype(np.int64)


def _left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def _pixels(tiny, count: int, seed: int) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((count, 3, tiny.image_size, tiny.image_size))
        .astype(np.float32)
    )


def _question_mask(tiny, ids: np.ndarray) -> np.ndarray:
    """The prompt of one unpadded row: tokens after its last image, not special."""
    last = np.flatnonzero(ids == tiny.image_token_index).max()
    after = np.arange(len(ids)) > last
    return after & ~np.isin(ids, [tiny.bos_token_id, tiny.pad_token_id, 2])


def _hf_row(tiny, ids: np.ndarray, px: np.ndarray):
    """One unpadded row through transformers' pieces: its visual tokens [N, D] (images in
    reading order), its input-embedding rows [L, D] and its placeholder positions [N]."""
    hf = tiny.hf
    with torch.no_grad():
        feats = hf.model.get_image_features(
            pixel_values=torch.as_tensor(px), return_dict=True
        ).pooler_output
        feats = (
            torch.cat(list(feats))
            if isinstance(feats, (list, tuple))
            else feats.reshape(-1, feats.shape[-1])
        )
        embeds = hf.get_input_embeddings()(
            torch.as_tensor(np.where(ids == tiny.image_token_index, 0, ids))
        )
    return feats, embeds, np.flatnonzero(ids == tiny.image_token_index)


def _reference_kept(tiny, ids, px, keep: int, budget: str) -> np.ndarray:
    """The eager torch ZSPAPrune over the row's visual tokens together, or over each image."""
    feats, embeds, _ = _hf_row(tiny, ids, px)
    prompt = torch.as_tensor(_question_mask(tiny, ids))[None]
    if budget == "row":
        return select_tokens_reference(
            feats[None], embeds[None], prompt, keep=keep, core_ratio=0.6
        ).numpy()[0]
    n = tiny.tokens_per_image
    return np.concatenate(
        [
            select_tokens_reference(
                feats[i * n : (i + 1) * n][None], embeds[None], prompt, keep=keep, core_ratio=0.6
            ).numpy()[0]
            + i * n
            for i in range(len(px))
        ]
    )


def _hf_pruned_logits(tiny, ids, px, kept, keep_positions: bool) -> np.ndarray:
    """transformers on one row with only the kept visual tokens (their embeddings written in)."""
    feats, embeds, slots = _hf_row(tiny, ids, px)
    embeds = embeds.clone()
    embeds[torch.as_tensor(slots)] = feats
    src = np.sort(np.concatenate([np.setdiff1d(np.arange(len(ids)), slots), slots[kept]]))
    positions = src if keep_positions else np.arange(len(src))
    with torch.no_grad():
        return (
            tiny.hf(inputs_embeds=embeds[src][None], position_ids=torch.as_tensor(positions)[None])
            .logits[0]
            .numpy()
        )


ROWS = {  # (pieces, images) per row
    "row": [(((3, "img", 2, "img", 6)), 2), ((4, "img", 5), 1)],  # rows of 2 and 1 images
    "image": [(((3, "img", 2, "img", 6)), 2), ((2, "img", "img", 4), 2)],  # adjacent images too
}


@pytest.mark.parametrize(
    "budget, keep_positions",
    [("row", False), ("row", True), ("image", True)],
    ids=["row-renumbered", "row-original_positions", "image-original_positions"],
)
@pytest.mark.slow
def test_rows_of_several_images_match_transformers(
    tiny, vlm, budget, keep_positions, parity_record
):
    rows = [_row(tiny, pieces, seed=40 + i) for i, (pieces, _) in enumerate(ROWS[budget])]
    counts = [images for _, images in ROWS[budget]]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    px = _pixels(tiny, sum(counts), seed=41)
    prune = PruneConfig(keep=KEEP, budget=budget)
    logits, kept, out_mask = zspa_jax.forward(
        vlm, ids, px, mask, prune, keep_positions=keep_positions, return_kept=True, return_mask=True
    )
    per_row = KEEP * max(counts) if budget == "image" else KEEP
    assert kept.shape == (2, per_row)
    starts = np.cumsum([0] + counts)
    for b, row in enumerate(rows):
        row_px = px[starts[b] : starts[b + 1]]
        np.testing.assert_array_equal(
            kept[b], _reference_kept(tiny, row, row_px, KEEP, budget), err_msg=f"row {b}"
        )
        assert (np.diff(kept[b]) > 0).all() and kept[b].max() < counts[b] * tiny.tokens_per_image
        ref = _hf_pruned_logits(tiny, row, row_px, kept[b], keep_positions)
        got = logits[b][out_mask[b].astype(bool)]
        assert got.shape == ref.shape
        d = parity_record(
            "LLaVA several images, pruned logits",
            f"budget={budget} {keep_positions=} row {b}",
            float(np.abs(got - ref).max()),
            BOUND,
        )
        assert d <= BOUND


@pytest.mark.slow
def test_a_row_in_a_batch_of_mixed_image_counts_equals_the_row_alone(tiny, vlm):
    # The one-image row is the longer one: no left padding could stand in for its missing slots.
    rows = [_row(tiny, (3, "img", 1, "img", 4), seed=51), _row(tiny, (2, "img", 25), seed=50)]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    px = _pixels(tiny, 3, seed=52)
    for method in (
        "zspaprune",
        "uniform",
    ):  # a scored and a positional choice; the rest share the path
        prune = PruneConfig(keep=KEEP, method=method)
        logits, kept, out_mask = zspa_jax.forward(
            vlm, ids, px, mask, prune, return_kept=True, return_mask=True
        )
        for b, row_px in enumerate((px[:2], px[2:])):
            alone_logits, alone_kept = zspa_jax.forward(
                vlm, rows[b][None], row_px, prune=prune, return_kept=True
            )
            np.testing.assert_array_equal(kept[b], alone_kept[0], err_msg=f"{method} row {b}")
            np.testing.assert_allclose(
                logits[b][out_mask[b].astype(bool)], alone_logits[0], atol=1e-5, rtol=0
            )


@pytest.mark.slow
def test_tower_methods_prune_each_image_on_its_own(tiny, vlm):
    """VisPruner / VisionZip read one image's [CLS] attention: with budget="image" a row of two
    images keeps exactly what each image keeps in a prompt of its own."""
    two = _row(tiny, (2, "img", 1, "img", 3), seed=60)
    one = _row(tiny, (2, "img", 3), seed=60)
    px = _pixels(tiny, 2, seed=61)
    n = tiny.tokens_per_image
    for method in ("vispruner", "visionzip"):
        prune = PruneConfig(keep=KEEP, method=method, budget="image")
        _, kept = zspa_jax.forward(vlm, two[None], px, prune=prune, return_kept=True)
        alone = [
            zspa_jax.forward(vlm, one[None], px[i : i + 1], prune=prune, return_kept=True)[1][0]
            for i in range(2)
        ]
        np.testing.assert_array_equal(
            kept[0], np.concatenate([alone[0], alone[1] + n]), err_msg=method
        )
        with pytest.raises(
            ValueError,
            match=f"method '{method}' reads the vision tower's .* use PruneConfig\\(budget='image'\\)",
        ):
            zspa_jax.forward(vlm, two[None], px, prune=PruneConfig(keep=KEEP, method=method))


@pytest.mark.slow
def test_fastv_over_several_images_matches_transformers(tiny, vlm, parity_record):
    from tests.support.drop_at_layer import DropAtLayer

    row = _row(tiny, (2, "img", 2, "img", 5), seed=70)
    px = _pixels(tiny, 2, seed=71)
    layer = 2
    logits, kept = zspa_jax.forward(
        vlm,
        row[None],
        px,
        prune=PruneConfig(keep=KEEP, method="fastv", layer=layer),
        return_kept=True,
    )
    slots = np.flatnonzero(row == tiny.image_token_index)
    with torch.no_grad():
        out = tiny.hf(
            input_ids=torch.as_tensor(row[None]),
            pixel_values=torch.as_tensor(px),
            output_attentions=True,
        )
    scores = out.attentions[layer - 1][0, :, -1, :].mean(0)[torch.as_tensor(slots)]
    np.testing.assert_array_equal(
        kept[0], np.sort(torch.sort(scores, descending=True, stable=True).indices[:KEEP].numpy())
    )
    src = np.sort(np.concatenate([np.setdiff1d(np.arange(len(row)), slots), slots[kept[0]]]))
    hooks = DropAtLayer(tiny.hf.model.language_model, layer, src, len(row))
    try:
        with torch.no_grad():
            ref = tiny.hf(
                input_ids=torch.as_tensor(row[None]), pixel_values=torch.as_tensor(px)
            ).logits.numpy()
    finally:
        hooks.remove()
    d = parity_record(
        "LLaVA several images, fastv logits",
        f"K={layer} keep={KEEP}",
        float(np.abs(logits - ref).max()),
        BOUND,
    )
    assert d <= BOUND


def test_image_budget_keeps_each_images_tokens_in_its_own_span(tiny, vlm):
    """budget="image" runs the method on each image of each row: every image's K kept
    indices lie in that image's placeholder span, and a row keeps the same tokens whichever
    row of the batch it is (both orders: the same compiled program), so no image's choice
    lands in, or reads the prompt of, another row."""
    rows = [_row(tiny, pieces, seed=70 + i) for i, (pieces, _) in enumerate(ROWS["image"])]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    px = _pixels(tiny, 4, seed=70)  # row 0's two images, then row 1's
    prune = PruneConfig(keep=KEEP, budget="image")
    n = tiny.tokens_per_image
    _, kept = zspa_jax.forward(vlm, ids, px, mask, prune, return_kept=True)
    assert kept.shape == (2, 2 * KEEP)
    for b in range(2):
        for i in range(2):
            block = kept[b, i * KEEP : (i + 1) * KEEP]
            assert ((block >= i * n) & (block < (i + 1) * n)).all(), f"row {b} image {i}: {block}"
            assert (np.diff(block) > 0).all()
    _, swapped = zspa_jax.forward(
        vlm, ids[::-1], np.concatenate([px[2:], px[:2]]), mask[::-1], prune, return_kept=True
    )
    np.testing.assert_array_equal(swapped[::-1], kept)


def test_budget_and_layout_errors(tiny, vlm):
    rows = [_row(tiny, (2, "img", 3), seed=80), _row(tiny, (3, "img", 1, "img", 4), seed=81)]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    px = _pixels(tiny, 3, seed=82)
    with pytest.raises(
        ValueError,
        match=r"budget='image' needs the same number of images in every prompt.*\[1, 2\]",
    ):
        zspa_jax.forward(vlm, ids, px, mask, PruneConfig(keep=KEEP, budget="image"))
    with pytest.raises(
        ValueError, match="budget='image' is for methods that choose before the LLM.*'fastv'"
    ):
        PruneConfig(keep=KEEP, method="fastv", budget="image")
    with pytest.raises(
        ValueError, match=r"PruneConfig.budget must be one of \('row', 'image'\), got 'images'"
    ):
        PruneConfig(keep=KEEP, budget="images")
    with pytest.raises(
        ValueError, match="method 'pool' reads one image's token grid.*budget='image'"
    ):
        zspa_jax.forward(vlm, ids, px, mask, PruneConfig(keep=4, method="pool"))
    n = tiny.tokens_per_image
    with pytest.raises(
        ValueError, match=f"keep={n + 1} exceeds the number of visual tokens n_visual={n}"
    ):
        zspa_jax.forward(
            vlm, ids, px, mask, PruneConfig(keep=n + 1)
        )  # more than the 1-image row has


@pytest.mark.slow
def test_strings_with_several_images_match_the_processor(tiny, vlm):
    from PIL import Image
    from transformers import AutoProcessor

    rng = np.random.default_rng(90)
    images = [
        Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 28, 3), dtype=np.uint8)) for i in range(3)
    ]
    prompts = ["<image> and <image>: which is brighter?", "describe"]
    ours = zspa_jax.encode(vlm, prompts, [images[:2], images[2]], chat_template=False)
    processor = AutoProcessor.from_pretrained(tiny.path)
    processor.tokenizer.padding_side = "left"
    ref = processor(
        text=["<image> and <image>: which is brighter?", "<image>\ndescribe"],
        images=images,
        return_tensors="np",
        padding=True,
    )
    for key in ("input_ids", "attention_mask", "pixel_values"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert (ours["input_ids"][0] == tiny.image_token_index).sum() == 2 * tiny.tokens_per_image
    res = zspa_jax.generate(
        vlm,
        prompts,
        [images[:2], images[2]],
        chat_template=False,
        max_new_tokens=3,
        prune=PruneConfig(keep=KEEP),
    )
    assert res.kept_indices.shape == (2, KEEP) and res.kept_indices[1].max() < tiny.tokens_per_image
    assert res.stats["visual_tokens_per_row"] == [2 * tiny.tokens_per_image, tiny.tokens_per_image]
    with pytest.raises(
        ValueError, match=r"prompts\[0\] contains the image token '<image>' 2 times for 1 image"
    ):
        zspa_jax.encode(vlm, prompts[:1], [images[0]], chat_template=False)
    with pytest.raises(ValueError, match=r"got 1 prompt\(s\) but 2 image\(s\)"):
        zspa_jax.encode(vlm, prompts[:1], images[:2])
    with pytest.raises(ValueError, match=r"images\[0\] is an empty list"):
        zspa_jax.encode(vlm, prompts[:1], [[]])
