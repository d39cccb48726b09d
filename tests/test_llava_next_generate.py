"""LLaVA-NeXT through the public API (`zspa_jax.load`, `forward`, `generate`, pruning) against
transformers: a left-padded batch whose rows hold images of different sizes (different crop
grids, so different numbers of visual tokens), pruned and unpruned, greedy tokens, kept
indices, strings + PIL, compile counts and bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import zspa_jax
from tests.support.tiny_llava_next import hf_pieces, hf_row_logits, rows, tiny_llava_next
from tests.support.torch_reference_pruning import select_tokens_reference
from zspa_jax import generation
from zspa_jax.families.llava_next.layout import image_token_count

BOUND = 1e-4  # pruned-logit bound of the other families' pruned parity tests
SIZES = [(40, 70), (64, 30), (32, 32)]  # 52, 56 and 36 visual tokens (crop grids 1x2, 2x1, 1x1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def vlm(tiny):
    return zspa_jax.load(tiny.out)


PLAN = [(3, [SIZES[0]], 6), (1, [SIZES[1]], 4)]  # rows of 52 and 56 visual tokens


@pytest.mark.parametrize("keep_positions", [False, True], ids=["renumbered", "original_positions"])
@pytest.mark.slow
def test_pruned_logits_and_kept_indices_match_references(tiny, vlm, keep_positions, parity_record):
    keep = 6
    b = rows(tiny, PLAN, seed=3)
    ids, mask, pixels, sizes = (
        b["input_ids"],
        b["attention_mask"],
        b["pixel_values"],
        b["image_sizes"],
    )
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        ids,
        pixels,
        mask,
        zspa_jax.PruneConfig(keep=keep),
        image_sizes=sizes,
        keep_positions=keep_positions,
        return_kept=True,
        return_mask=True,
    )
    merged, raw = hf_pieces(tiny, b)
    specials = [1, 2, tiny.pad_token]
    for row in range(2):
        slots = np.flatnonzero(ids[row] == tiny.image_token)
        question = (
            (np.arange(ids.shape[1]) > slots.max())
            & (mask[row] == 1)
            & ~np.isin(ids[row], specials)
        )
        expect = select_tokens_reference(
            merged[row, slots][None],
            raw[row][None],
            torch.as_tensor(question)[None],
            keep=keep,
            core_ratio=0.6,
        ).numpy()[0]
        np.testing.assert_array_equal(kept[row], expect, err_msg=f"row {row}")
        ref = hf_row_logits(tiny, merged, b, row, kept[row], keep_positions)
        d = parity_record(
            "LLaVA-NeXT pruned logits",
            f"{keep_positions=} row {row}",
            float(np.abs(logits[row][out_mask[row].astype(bool)] - ref).max()),
            BOUND,
        )
        assert d <= BOUND


@pytest.mark.slow
def test_greedy_tokens_match_transformers_generate(tiny, vlm):
    b = rows(tiny, PLAN, seed=5)
    ids, mask, pixels, sizes = (
        b["input_ids"],
        b["attention_mask"],
        b["pixel_values"],
        b["image_sizes"],
    )
    ours = zspa_jax.generate(
        vlm,
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=mask,
        image_sizes=sizes,
        max_new_tokens=8,
        eos_token_id=[],
    )
    pruned = zspa_jax.generate(
        vlm,
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=mask,
        image_sizes=sizes,
        max_new_tokens=8,
        eos_token_id=[],
        prune=zspa_jax.PruneConfig(keep=5),
    )
    merged, _ = hf_pieces(tiny, b)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tiny.pad_token)
    for row in range(2):
        real = mask[row] == 1
        with torch.no_grad():
            ref = tiny.hf.generate(
                input_ids=torch.as_tensor(ids[row : row + 1, real]),
                pixel_values=torch.as_tensor(pixels[row : row + 1]),
                image_sizes=torch.as_tensor(sizes[row : row + 1]),
                **kw,
            ).numpy()
        np.testing.assert_array_equal(
            ours.sequences[row], ref[0, real.sum() :], err_msg=f"row {row}"
        )
        # Pruned: transformers generating from the kept slots' embeddings (renumbered positions).
        slots = np.flatnonzero(ids[row] == tiny.image_token)
        src = np.sort(
            np.concatenate(
                [np.setdiff1d(np.flatnonzero(real), slots), slots[pruned.kept_indices[row]]]
            )
        )
        with torch.no_grad():
            ref = tiny.hf.generate(inputs_embeds=merged[row, src][None], **kw).numpy()
        np.testing.assert_array_equal(
            pruned.sequences[row], ref[0, -8:], err_msg=f"pruned row {row}"
        )
    assert not np.array_equal(ours.sequences, pruned.sequences)


@pytest.mark.slow
def test_several_images_per_row_and_every_served_method(tiny, vlm):
    """A row of two images of different sizes next to a row of one: a method gives a row what it
    gives the row alone, and budget="image" keeps K of each image."""
    # The one-image row is the longer one: no left padding could stand in for its missing slots.
    b = rows(tiny, [(2, [SIZES[0], SIZES[2]], 5), (1, [SIZES[1]], 40)], seed=7)
    ids, mask, pixels, sizes = (
        b["input_ids"],
        b["attention_mask"],
        b["pixel_values"],
        b["image_sizes"],
    )
    counts = [image_token_count(s, tiny.cfg) for s in sizes]
    # Every served method's row-vs-alone on one-image rows is tests/test_families.py's; here the
    # layout of several images per row, for a method before the LLM and one inside it.
    for method, options in (("zspaprune", None), ("dart", {"layer": 1})):
        prune = zspa_jax.PruneConfig(keep=5, method=method, options=options)
        logits, kept, out_mask = zspa_jax.forward(
            vlm, ids, pixels, mask, prune, image_sizes=sizes, return_kept=True, return_mask=True
        )
        for row, (lo, hi) in enumerate(((0, 2), (2, 3))):
            real = mask[row] == 1
            alone, alone_kept = zspa_jax.forward(
                vlm,
                ids[row : row + 1, real],
                pixels[lo:hi],
                prune=prune,
                image_sizes=sizes[lo:hi],
                return_kept=True,
            )
            np.testing.assert_array_equal(kept[row], alone_kept[0], err_msg=f"{method} row {row}")
            np.testing.assert_allclose(
                logits[row][out_mask[row].astype(bool)],
                alone[0],
                atol=2e-5,
                rtol=0,
                err_msg=f"{method} row {row}",
            )
    both = np.stack([ids[0], ids[0]]), np.stack([mask[0], mask[0]])
    _, kept = zspa_jax.forward(
        vlm,
        both[0],
        np.concatenate([pixels[:2]] * 2),
        both[1],
        zspa_jax.PruneConfig(keep=5, budget="image"),
        image_sizes=np.concatenate([sizes[:2]] * 2),
        return_kept=True,
    )
    assert kept.shape == (2, 10)
    assert (kept[:, :5] < counts[0]).all() and (kept[:, 5:] >= counts[0]).all()


@pytest.mark.slow
def test_one_program_across_image_sizes(tiny, vlm):
    """Images of different sizes (different crop grids) share one prefill and one decode
    program: crops padded to the most a pinpoint needs, slots to a bucket."""
    prune = zspa_jax.PruneConfig(keep=6)

    def run(size, seed):
        b = rows(tiny, [(2, [size], 4)], seed=seed)
        return zspa_jax.generate(vlm, **b, max_new_tokens=3, prune=prune)

    run(SIZES[0], 9)
    before = dict(generation.TRACE_COUNTS)
    for i, size in enumerate(
        SIZES[1:] + [(70, 40), (20, 60)]
    ):  # 56, 36, 56, 34 tokens: one 64-slot bucket
        assert run(size, 10 + i).kept_indices.shape == (1, 6)
    assert dict(generation.TRACE_COUNTS) == before


@pytest.mark.slow
def test_strings_and_pil_through_the_saved_processor(tiny, vlm):
    rng = np.random.default_rng(11)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[:2]
    ]
    prompts = ["<image>\nWhat is shown?", "Describe <image> briefly."]
    ours = zspa_jax.encode(vlm, prompts, images, chat_template=False)
    tiny.processor.tokenizer.padding_side = "left"
    ref = tiny.processor(text=prompts, images=images, return_tensors="np", padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    res = zspa_jax.generate(
        vlm,
        prompts,
        images,
        chat_template=False,
        max_new_tokens=4,
        eos_token_id=[],
        prune=zspa_jax.PruneConfig(keep=5),
    )
    direct = zspa_jax.generate(
        vlm,
        input_ids=ours["input_ids"],
        pixel_values=ours["pixel_values"],
        attention_mask=ours["attention_mask"],
        image_sizes=ours["image_sizes"],
        max_new_tokens=4,
        eos_token_id=[],
        prune=zspa_jax.PruneConfig(keep=5),
    )
    np.testing.assert_array_equal(res.sequences, direct.sequences)
    assert res.stats["visual_tokens_per_row"] == [image_token_count(s, tiny.cfg) for s in SIZES[:2]]


def test_bad_input_names_the_argument(tiny, vlm):
    b = rows(tiny, PLAN, seed=12)
    ids, mask, pixels, sizes = (
        b["input_ids"],
        b["attention_mask"],
        b["pixel_values"],
        b["image_sizes"],
    )
    with pytest.raises(ValueError, match="image_sizes is required with LLaVA-NeXT pixel_values"):
        zspa_jax.forward(vlm, ids, pixels, mask)
    with pytest.raises(
        ValueError, match=r"image_sizes holds 1 image size\(s\) but pixel_values holds 2"
    ):
        zspa_jax.forward(vlm, ids, pixels, mask, image_sizes=sizes[:1])
    with pytest.raises(ValueError, match=r"input_ids holds \d+ image tokens .* need"):
        zspa_jax.forward(vlm, ids, pixels, mask, image_sizes=sizes[::-1] * np.array([[1, 2]]))
    with pytest.raises(
        ValueError, match="image_grid_thw is not used by LLaVA-NeXT models; it takes image_sizes"
    ):
        zspa_jax.forward(
            vlm, ids, pixels, mask, image_sizes=sizes, image_grid_thw=np.ones((2, 3), int)
        )
    with pytest.raises(ValueError, match="video input is not supported by LLaVA-NeXT"):
        zspa_jax.forward(vlm, ids, pixels, mask, image_sizes=sizes, pixel_values_videos=pixels)
    with pytest.raises(
        ValueError,
        match="method 'pool' reads each image's visual tokens as a 2-D grid; LLaVA-NeXT's",
    ):
        zspa_jax.forward(
            vlm, ids, pixels, mask, zspa_jax.PruneConfig(keep=4, method="pool"), image_sizes=sizes
        )


@pytest.mark.slow
def test_lmms_eval_runner_answers_as_generate(tiny, vlm):
    """The lmms-eval model (`--model zspa_jax`) serves LLaVA-NeXT checkpoints: its answers are
    `generate`'s on the same prompts and images (image sizes through the saved processor)."""
    from zspa_jax.eval.args import parse_model_args
    from zspa_jax.eval.runner import GenRequest, Runner

    rng = np.random.default_rng(14)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[:2]
    ]
    requests = [
        GenRequest(f"<image>\nQuestion {i}?", (im,), {"max_new_tokens": 3})
        for i, im in enumerate(images)
    ]
    runner = Runner(
        parse_model_args({"pretrained": str(tiny.out), "keep": "5", "batch_size": "2"}), vlm
    )
    got = runner.generate_until(requests)
    expect = [
        zspa_jax.generate(
            vlm, [r.context], [list(r.images)], prune=zspa_jax.PruneConfig(keep=5), max_new_tokens=3
        ).texts[0]
        for r in requests
    ]
    assert got == expect and len(set(got)) > 1
