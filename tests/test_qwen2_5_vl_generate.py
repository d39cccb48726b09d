"""Qwen2.5-VL through the public API (zspa_jax.load / forward / generate) against transformers:
greedy generation, pruning at original 3-D positions, kept indices against the eager
torch ZSPAPrune reference on HF's merger output, strings + PIL through the processor,
one compiled program across image sizes, and bad input refused before any compile."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

import zspa_jax
from tests.support.tiny_qwen2_5_vl import (
    converted,
    hf_greedy_from_pruned,
    hf_inputs,
    hf_pruned_row_logits,
    random_image,
    tiny_model,
)
from tests.support.torch_reference_pruning import select_tokens_reference
from zspa_jax import decode, generation
from zspa_jax.pipeline import prompt_token_mask

BOUND = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def vlm(tiny):
    return zspa_jax.load(converted(tiny))


def _np(batch):
    return {k: v.numpy() for k, v in batch.items()}


def _hf_generate(tiny, batch, n):
    with torch.no_grad():
        out = tiny.hf.generate(**batch, max_new_tokens=n, do_sample=False)
    return out[:, batch["input_ids"].shape[1] :].numpy()


PROMPTS = [("what is shown in this picture", 2), ("describe the image", 1)]
IMAGES = [(40, 56), (24, 32), (16, 48)]


def test_greedy_generation_matches_hf(tiny, vlm):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGES)]
    batch = hf_inputs(tiny.processor, PROMPTS, images)  # row 0 holds two images; left-padded
    ref = _hf_generate(tiny, batch, 12)
    a = _np(batch)
    res = zspa_jax.generate(
        vlm,
        input_ids=a["input_ids"],
        pixel_values=a["pixel_values"],
        attention_mask=a["attention_mask"],
        image_grid_thw=a["image_grid_thw"],
        max_new_tokens=12,
    )
    np.testing.assert_array_equal(res.sequences, ref[:, : res.sequences.shape[1]])
    assert (
        res.sequences.shape[1] == ref.shape[1]
        or (ref[:, res.sequences.shape[1] :] == vlm.pad_token_id).all()
    )
    # generate_tokens (array API) gives the same tokens (prompt pre-padded to generate's
    # bucket, so the compiled programs are shared).
    extra = generation.prompt_bucket(a["input_ids"].shape[1]) - a["input_ids"].shape[1]
    ids = np.pad(a["input_ids"], ((0, 0), (extra, 0)), constant_values=vlm.pad_token_id)
    mask = np.pad(a["attention_mask"], ((0, 0), (extra, 0)))
    out = zspa_jax.generate_tokens(
        vlm, ids, a["pixel_values"], mask, image_grid_thw=a["image_grid_thw"], max_new_tokens=12
    )
    np.testing.assert_array_equal(
        np.asarray(out.tokens)[:, : res.sequences.shape[1]], res.sequences
    )


@pytest.mark.slow
def test_strings_and_pil_match_hf_processor_and_generate(tiny, vlm):
    prompts = ["what is shown in this image", "how many cats are there"]
    images = [random_image(40, 24, seed=11), random_image(32, 56, seed=12)]
    batch = hf_inputs(tiny.processor, [(p, 1) for p in prompts], images)
    ours = vlm.processor.encode(prompts, images)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(ours[key], batch[key].numpy(), err_msg=key)
    ref = _hf_generate(tiny, batch, 10)
    res = zspa_jax.generate(vlm, prompts, images, max_new_tokens=10)
    np.testing.assert_array_equal(res.sequences, ref[:, : res.sequences.shape[1]])
    texts = [
        tiny.processor.tokenizer.decode(
            [t for t in row if t not in vlm.eos_token_ids], skip_special_tokens=True
        ).strip()
        for row in res.sequences
    ]
    assert res.texts == texts


def _question_mask(tiny, vlm, ids, mask):
    """The prompt tokens, from the tokenizer's own special list: after the image span,
    real, not special (chat template and vision tokens never count)."""
    tok = tiny.processor.tokenizer
    special = set(tok.all_special_ids) | {tok.pad_token_id, tok.eos_token_id}
    special.discard(tiny.image_token_id)
    out = np.zeros(ids.shape, bool)
    for r in range(ids.shape[0]):
        last = np.flatnonzero(ids[r] == tiny.image_token_id).max()
        for j in range(last + 1, ids.shape[1]):
            out[r, j] = mask[r, j] == 1 and int(ids[r, j]) not in special
    return out


@pytest.mark.parametrize(
    "sizes", [[(40, 56), (40, 56)], [(40, 56), (24, 32)]], ids=["same_size", "different_sizes"]
)
@pytest.mark.slow
def test_pruned_logits_and_kept_indices_match_references(tiny, vlm, sizes, parity_record):
    keep = 5
    prompts = [("what color is the cat on the left", 1), ("describe the small dog", 1)]
    images = [random_image(h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    batch = hf_inputs(tiny.processor, prompts, images)
    a = _np(batch)
    prune = zspa_jax.PruneConfig(keep=keep, core_ratio=0.6)
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        a["input_ids"],
        a["pixel_values"],
        a["attention_mask"],
        prune,
        image_grid_thw=a["image_grid_thw"],
        return_kept=True,
        return_mask=True,
    )
    assert kept.shape == (2, keep)
    ids, mask = a["input_ids"], a["attention_mask"]
    qmask = _question_mask(tiny, vlm, ids, mask)
    ours_mask = np.asarray(
        prompt_token_mask(ids, mask, tiny.image_token_id, vlm.special_token_ids, "question")
    )
    np.testing.assert_array_equal(ours_mask, qmask)
    for row in range(2):
        ref, ref_mask, feats, embeds = hf_pruned_row_logits(tiny, batch, row, kept[row])
        # Kept indices: the eager torch ZSPAPrune on HF's merger output and HF's embeddings.
        expect = select_tokens_reference(
            feats[row][None],
            embeds[row][None],
            torch.tensor(qmask[row])[None],
            keep=keep,
            core_ratio=0.6,
        ).numpy()[0]
        np.testing.assert_array_equal(kept[row], expect)
        got = logits[row][out_mask[row].astype(bool)]
        d = parity_record(
            "qwen pruned logits (3-D positions)",
            f"{'/'.join(map(str, sizes))} row {row}",
            float(np.abs(got - ref[ref_mask]).max()),
            BOUND,
        )
        assert d <= BOUND


@pytest.mark.slow
def test_pool_on_rows_of_different_grids_matches_transformers(tiny, vlm, parity_record):
    """`pool` over each row's own merged-token grid (images of different sizes in one batch):
    tokens and centre slots equal adaptive_avg_pool2d on transformers' merger output, and the
    logits equal transformers fed those tokens at those slots' 3-D positions."""
    from tests.support.torch_reference_pool import pool_reference

    keep = 2
    images = [random_image(40, 56, seed=30), random_image(24, 32, seed=31)]
    batch = hf_inputs(tiny.processor, [("what is on the left", 1), ("describe it", 1)], images)
    a = _np(batch)
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        a["input_ids"],
        a["pixel_values"],
        a["attention_mask"],
        zspa_jax.PruneConfig(keep=keep, method="pool"),
        image_grid_thw=a["image_grid_thw"],
        return_kept=True,
        return_mask=True,
    )
    merge = tiny.hf.config.vision_config.spatial_merge_size
    grids = [(int(g[1]) // merge, int(g[2]) // merge) for g in a["image_grid_thw"]]
    assert grids[0] != grids[1]
    with torch.no_grad():
        feats = tiny.hf.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"]
        ).pooler_output
    for row in range(2):
        tokens, slots = pool_reference(feats[row][None], [grids[row]], keep)
        np.testing.assert_array_equal(kept[row], slots.numpy()[0])
        ref, ref_mask, _, _ = hf_pruned_row_logits(tiny, batch, row, kept[row], tokens=tokens[0])
        got = logits[row][out_mask[row].astype(bool)]
        d = parity_record(
            "qwen pool logits (3-D positions)",
            f"row {row} grid {grids[row]}",
            float(np.abs(got - ref[ref_mask]).max()),
            BOUND,
        )
        assert d <= BOUND


SEVERAL = {  # budget -> (prompts with their image counts, image sizes in reading order)
    # The one-image row is the longer one: no left padding could stand in for its missing slots.
    "row": (
        [
            ("compare the two pictures", 2),
            (
                "describe the small dog on the left of the red sofa by the window "
                "in the afternoon light and say what it holds",
                1,
            ),
        ],
        [(40, 56), (24, 32), (32, 40)],
    ),
    "image": (
        [("compare the two pictures", 2), ("which one is brighter", 2)],
        [(40, 56), (24, 32), (32, 40), (16, 48)],
    ),
}


@pytest.mark.parametrize(
    "budget, method", [("row", "zspaprune"), ("row", "cdpruner"), ("image", "zspaprune")]
)
@pytest.mark.slow
def test_several_images_per_row_match_references(tiny, vlm, budget, method, parity_record):
    """Rows of several images of different sizes (and rows of different image counts): kept
    indices index each row's placeholders in reading order and equal the eager torch
    reference over the row's tokens together (budget="row") or over each image ("image");
    logits equal transformers fed the kept tokens at their original 3-D positions."""
    from tests.support.torch_reference_pruning import cdpruner_reference

    keep = 5
    prompts, sizes = SEVERAL[budget]
    images = [random_image(h, w, seed=60 + i) for i, (h, w) in enumerate(sizes)]
    batch = hf_inputs(tiny.processor, prompts, images)
    a = _np(batch)
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        a["input_ids"],
        a["pixel_values"],
        a["attention_mask"],
        zspa_jax.PruneConfig(keep=keep, method=method, budget=budget),
        image_grid_thw=a["image_grid_thw"],
        return_kept=True,
        return_mask=True,
    )
    counts = [n for _, n in prompts]
    assert kept.shape == (2, keep * max(counts) if budget == "image" else keep)
    ids, mask = a["input_ids"], a["attention_mask"]
    qmask = _question_mask(tiny, vlm, ids, mask)
    tokens_per_image = (
        np.prod(a["image_grid_thw"], axis=-1) // tiny.hf.config.vision_config.spatial_merge_size**2
    )
    groups = np.split(tokens_per_image, np.cumsum(counts)[:-1])
    for row in range(2):
        ref, ref_mask, _, embeds = hf_pruned_row_logits(tiny, batch, row, kept[row])
        slots = torch.nonzero(batch["input_ids"][row] == tiny.image_token_id)[:, 0]
        visual, prompt = embeds[row, slots], torch.tensor(qmask[row])[None]

        def choose(v):
            if method == "cdpruner":
                return cdpruner_reference(v[None], embeds[row][None], prompt, keep=keep).numpy()[0]
            return select_tokens_reference(
                v[None], embeds[row][None], prompt, keep=keep, core_ratio=0.6
            ).numpy()[0]

        if budget == "row":
            expect = choose(visual)
        else:
            starts = np.cumsum([0, *groups[row][:-1]])
            expect = np.concatenate(
                [choose(visual[s : s + n]) + s for s, n in zip(starts, groups[row])]
            )
        np.testing.assert_array_equal(kept[row], expect, err_msg=f"row {row}")
        got = logits[row][out_mask[row].astype(bool)]
        d = parity_record(
            "qwen several images, pruned logits",
            f"{method} budget={budget} row {row}",
            float(np.abs(got - ref[ref_mask]).max()),
            BOUND,
        )
        assert d <= BOUND


def test_strings_with_several_images_match_the_processor(tiny, vlm):
    images = [
        random_image(40, 24, seed=90),
        random_image(32, 56, seed=91),
        random_image(24, 24, seed=92),
    ]
    prompts = [("compare these", 2), ("and this one", 1)]
    batch = hf_inputs(tiny.processor, prompts, images)
    ours = vlm.processor.encode([p for p, _ in prompts], [images[:2], images[2]])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(ours[key], batch[key].numpy(), err_msg=key)
    with pytest.raises(ValueError, match=r"got 1 prompt\(s\) but 2 image\(s\)"):
        vlm.processor.encode(["compare these"], images[:2])


@pytest.mark.slow
def test_several_images_greedy_generation_matches_transformers(tiny, vlm):
    """Pruned greedy tokens of a row with two images equal transformers generating from the
    pruned inputs_embeds at the kept tokens' 3-D positions, decoding after the unpruned max."""
    keep = 6
    prompt, images = (
        "compare the two pictures",
        [random_image(40, 56, seed=70), random_image(24, 32, seed=71)],
    )
    batch = hf_inputs(tiny.processor, [(prompt, 2)], images)
    res = zspa_jax.generate(
        vlm, [prompt], [images], max_new_tokens=6, prune=zspa_jax.PruneConfig(keep=keep)
    )
    kept = res.kept_indices[0]
    assert (
        kept.max() >= 35
    )  # tokens of the second image are among the kept (35 = the first image's)
    _, _, _, embeds = hf_pruned_row_logits(tiny, batch, 0, kept)
    ids = batch["input_ids"]
    positions, _ = tiny.hf.model.get_rope_index(
        ids,
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    tokens = hf_greedy_from_pruned(
        tiny.hf, embeds, positions, ids[0] == tiny.image_token_id, kept, vlm.eos_token_ids, 6
    )
    assert res.sequences[0, : len(tokens)].tolist() == tokens


@pytest.mark.slow
def test_pool_per_image_on_several_images(tiny, vlm, parity_record):
    """`pool` with budget="image" pools each image's own grid: tokens and centre slots equal
    adaptive_avg_pool2d per image, and the logits equal transformers fed them."""
    from tests.support.torch_reference_pool import pool_reference

    keep = 2
    images = [random_image(40, 56, seed=80), random_image(24, 32, seed=81)]
    batch = hf_inputs(tiny.processor, [("what is on the left", 2)], images)
    a = _np(batch)
    with pytest.raises(
        ValueError, match="method 'pool' reads one image's token grid.*budget='image'"
    ):
        zspa_jax.forward(
            vlm,
            a["input_ids"],
            a["pixel_values"],
            a["attention_mask"],
            zspa_jax.PruneConfig(keep=keep, method="pool"),
            image_grid_thw=a["image_grid_thw"],
        )
    logits, kept, out_mask = zspa_jax.forward(
        vlm,
        a["input_ids"],
        a["pixel_values"],
        a["attention_mask"],
        zspa_jax.PruneConfig(keep=keep, method="pool", budget="image"),
        image_grid_thw=a["image_grid_thw"],
        return_kept=True,
        return_mask=True,
    )
    merge = tiny.hf.config.vision_config.spatial_merge_size
    grids = [(int(g[1]) // merge, int(g[2]) // merge) for g in a["image_grid_thw"]]
    with torch.no_grad():
        feats = tiny.hf.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"]
        ).pooler_output
    tokens, slots, offset = [], [], 0
    for f, grid in zip(feats, grids):
        t, sl = pool_reference(f[None], [grid], keep)
        tokens.append(t[0])
        slots.append(sl.numpy()[0] + offset)
        offset += grid[0] * grid[1]
    np.testing.assert_array_equal(kept[0], np.concatenate(slots))
    ref, ref_mask, _, _ = hf_pruned_row_logits(tiny, batch, 0, kept[0], tokens=torch.cat(tokens))
    d = parity_record(
        "qwen pool per image (3-D positions)",
        f"grids {grids}",
        float(np.abs(logits[0][out_mask[0].astype(bool)] - ref[ref_mask]).max()),
        BOUND,
    )
    assert d <= BOUND


@pytest.mark.slow
def test_pruned_generation_continues_after_unpruned_max_position(tiny, vlm):
    """Greedy pruned generation equals HF generating from the pruned inputs_embeds with
    the kept tokens' original positions and decode positions max + 1, max + 2, ..."""
    keep = 6
    image = random_image(40, 56, seed=30)
    batch = hf_inputs(tiny.processor, [("what is on the table", 1)], [image])
    res = zspa_jax.generate(
        vlm,
        ["what is on the table"],
        [image],
        max_new_tokens=6,
        prune=zspa_jax.PruneConfig(keep=keep),
    )
    kept = res.kept_indices[0]
    hf = tiny.hf
    _, _, feats, embeds = hf_pruned_row_logits(tiny, batch, 0, kept)
    ids = batch["input_ids"]
    positions, _ = hf.model.get_rope_index(
        ids,
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    tokens = hf_greedy_from_pruned(
        hf, embeds, positions, ids[0] == tiny.image_token_id, kept, vlm.eos_token_ids, 6
    )
    assert res.sequences[0, : len(tokens)].tolist() == tokens


@pytest.mark.slow
def test_one_program_across_image_sizes(tiny, vlm):
    """Three image sizes (grids 10x14, 10x16, 12x16 patches: 35, 40, 48 merged tokens, one
    tower slot bucket of 64 merged tokens and one span bucket) with pruning compile one
    prefill and one decode program."""
    prune = zspa_jax.PruneConfig(keep=8)
    sizes = [(40, 56), (40, 64), (48, 64)]
    zspa_jax.generate(
        vlm, ["what is this"], [random_image(*sizes[0], seed=40)], max_new_tokens=4, prune=prune
    )
    before = dict(generation.TRACE_COUNTS)
    grids = []
    for i, (h, w) in enumerate(sizes[1:] + sizes[:1]):
        res = zspa_jax.generate(
            vlm, ["what is this"], [random_image(h, w, seed=41 + i)], max_new_tokens=4, prune=prune
        )
        grids.append(
            vlm.processor.encode(["x"], [random_image(h, w, seed=0)])["image_grid_thw"][0].tolist()
        )
        assert res.kept_indices.shape == (1, 8)
    assert sorted({tuple(g) for g in grids}) == [(1, 10, 14), (1, 10, 16), (1, 12, 16)]
    assert dict(generation.TRACE_COUNTS) == before, (before, dict(generation.TRACE_COUNTS))


def _arrays(tiny, n_images=1):
    images = [random_image(24, 32, seed=50 + i) for i in range(n_images)]
    return _np(hf_inputs(tiny.processor, [("what is this", n_images)], images))


BAD_INPUTS = {
    "grid_missing": (lambda a: a.pop("image_grid_thw"), "image_grid_thw is required"),
    "grid_vs_pixels": (
        lambda a: a.update(image_grid_thw=np.array([[1, 6, 10]])),
        "pixel_values holds 48 patch rows",
    ),
    "grid_vs_tokens": (
        lambda a: a.update(
            pixel_values=np.concatenate([a["pixel_values"], a["pixel_values"][:16]]),
            image_grid_thw=np.array([[1, 8, 8]]),
        ),
        "input_ids holds 12 image tokens",
    ),
    "too_small": (
        lambda a: a.update(image_grid_thw=np.array([[1, 1, 48]])),
        "too small for one merged token",
    ),
    # a clip of 2 temporal patches whose placeholders the prompt lacks
    "video_frames": (
        lambda a: a.update(
            pixel_values_videos=np.concatenate([a["pixel_values"]] * 2),
            video_grid_thw=np.array([[2, 6, 8]]),
        ),
        r"input_ids holds 0 video tokens .* but video_grid_thw gives \[24\]",
    ),
    "video_tensor": (
        lambda a: a.update(pixel_values_videos=a["pixel_values"]),
        "video_grid_thw is required with pixel_values_videos",
    ),
    "pixels_shape": (
        lambda a: a.update(pixel_values=a["pixel_values"].reshape(-1, 3, 32)),
        "flattened patches",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_compile(tiny, vlm, case):
    edit, needle = BAD_INPUTS[case]
    a = _arrays(tiny)
    a.pop("mm_token_type_ids")
    edit(a)
    before = dict(generation.TRACE_COUNTS)
    with pytest.raises(ValueError, match=needle):
        zspa_jax.generate(vlm, max_new_tokens=2, **a)
    with pytest.raises(ValueError, match=needle):
        zspa_jax.forward(vlm, **a)
    assert dict(generation.TRACE_COUNTS) == before


def test_span_that_does_not_match_its_grid(tiny, vlm):
    """Two images whose grids are swapped: the token total matches, each span does not."""
    images = [random_image(24, 32, seed=60), random_image(40, 56, seed=61)]
    a = _np(hf_inputs(tiny.processor, [("what is this", 2)], images))
    grid = a["image_grid_thw"][::-1].copy()
    first = int(np.prod(grid[0]))
    pixels = np.concatenate([a["pixel_values"][-first:], a["pixel_values"][:-first]])
    with pytest.raises(ValueError, match="does not match its grid"):
        zspa_jax.forward(vlm, a["input_ids"], pixels, a["attention_mask"], image_grid_thw=grid)


def test_bad_images_through_the_processor(vlm):
    with pytest.raises(ValueError, match="aspect ratio"):
        zspa_jax.generate(vlm, ["what is this"], [random_image(8, 2000, seed=0)], max_new_tokens=2)
    with pytest.raises(
        ValueError,
        match=r"images\[0\] looks like a video \(\[frames, height, width, channels\]\): "
        r"pass videos with videos=",
    ):
        zspa_jax.generate(
            vlm, ["what is this"], [np.zeros((4, 16, 16, 3), np.uint8)], max_new_tokens=2
        )
    with pytest.raises(ValueError, match="keep=200 exceeds"):
        zspa_jax.generate(
            vlm,
            ["what is this"],
            [random_image(16, 16, seed=0)],
            max_new_tokens=2,
            prune=zspa_jax.PruneConfig(keep=200),
        )


@pytest.mark.parametrize(
    "prune, needle",
    [
        (zspa_jax.PruneConfig(keep=4, method="vispruner"), "has no \\[CLS\\] token"),
        (zspa_jax.PruneConfig(keep=4, method="visionzip"), "has no \\[CLS\\] token"),
    ],
)
def test_methods_qwen_cannot_serve_are_refused_by_name(tiny, vlm, prune, needle):
    a = _arrays(tiny)
    a.pop("mm_token_type_ids")
    before = dict(generation.TRACE_COUNTS)
    with pytest.raises(ValueError, match=needle):
        zspa_jax.generate(vlm, max_new_tokens=2, prune=prune, **a)
    with pytest.raises(ValueError, match=needle):
        zspa_jax.forward(vlm, prune=prune, **a)
    assert dict(generation.TRACE_COUNTS) == before


def test_only_the_cls_methods_are_refused(vlm):
    """Every method but the [CLS]-attention ones passes Qwen2.5-VL's support check (FastV and
    DART included: tests/test_qwen2_5_vl_llm_methods.py checks them against transformers)."""
    from zspa_jax.families import family_of
    from zspa_jax.methods import METHODS

    refused = set()
    for name in METHODS:
        try:
            family_of(vlm).check_method(zspa_jax.PruneConfig(keep=4, method=name))
        except ValueError as e:
            assert "[CLS]" in str(e), (name, str(e))
            refused.add(name)
    assert refused == {"vispruner", "visionzip"}


@pytest.mark.slow
def test_lmms_eval_runner_serves_qwen(vlm):
    """The lmms-eval model's runner is family-agnostic: its answers and scores on Qwen2.5-VL
    equal `generate` and `forward`, with images of different sizes in one batch."""
    from zspa_jax.eval.args import parse_model_args
    from zspa_jax.eval.runner import GenRequest, LoglikelihoodRequest, Runner

    args = parse_model_args(
        {"pretrained": str(vlm.path), "keep": 8, "batch_size": 2, "max_new_tokens": 4}
    )
    runner = Runner(args, vlm=vlm)
    images = [random_image(40, 56, seed=70), random_image(24, 32, seed=71)]
    answers = runner.generate_until(
        [GenRequest("what is this", (im,), {"max_new_tokens": 4}) for im in images]
    )
    for answer, image in zip(answers, images):
        expected = zspa_jax.generate(
            vlm, ["what is this"], [image], prune=args.prune, max_new_tokens=4
        ).texts[0]
        assert answer == expected
    ((score, _),) = runner.loglikelihood(
        [LoglikelihoodRequest("what is this", " a cat", (images[0],))]
    )
    assert np.isfinite(score) and score < 0


@pytest.mark.slow
def test_stats_count_each_rows_own_visual_tokens(vlm):
    images = [random_image(40, 56, seed=80), random_image(24, 32, seed=81)]
    res = zspa_jax.generate(
        vlm,
        ["what is this", "what is this"],
        images,
        prune=zspa_jax.PruneConfig(keep=8),
        max_new_tokens=2,
    )
    grids = vlm.processor.encode(["x", "x"], images)["image_grid_thw"]
    per_row = [int(np.prod(g)) // vlm.config.vision.merge_unit for g in grids]
    s = res.stats
    assert s["visual_tokens_per_row"] == per_row and per_row[0] != per_row[1]
    assert s["visual_tokens_per_image"] == min(per_row) and s["visual_tokens_kept_per_image"] == 8
    assert s["prompt_tokens_per_row_pruned"] == [
        t - n + 8 for t, n in zip(s["prompt_tokens_per_row"], per_row)
    ]


def test_pruned_prefill_runs_the_tower_once_and_costs_fewer_flops(vlm, monkeypatch):
    """The pruned prefill program holds one vision tower, like the unpruned one, and XLA
    counts fewer flops for it (a shorter LLM prefill; the selection is cheap): catches the
    tower, or another big piece, being built twice when pruning (no timing involved)."""
    from models.qwen2_5_vl import Qwen2_5_VisionTransformer
    from zspa_jax.batch import device_arrays, prepare_arrays
    from zspa_jax.sampling import Sampling

    towers = []
    blocks_out = Qwen2_5_VisionTransformer.blocks_out
    monkeypatch.setattr(
        Qwen2_5_VisionTransformer,
        "blocks_out",
        lambda *a, **k: towers.append(1) or blocks_out(*a, **k),
    )
    # 64 merged tokens fill one span bucket exactly; a smaller image's span padding can
    # leave the pruned prompt longer than the unpruned one (the bucket, not the pruning).
    enc = vlm.processor.encode(["what is in the picture"], [random_image(64, 64, seed=50)])
    assert int((enc["input_ids"] == vlm.config.image_token_id).sum()) == 64
    flops = {}
    for keep in (None, 8):
        prune = None if keep is None else zspa_jax.PruneConfig(keep=keep)
        host = prepare_arrays(
            vlm,
            enc["input_ids"],
            enc["pixel_values"],
            enc["attention_mask"],
            {"image_grid_thw": enc["image_grid_thw"]},
            prune,
            extra_length=4,
            bucket=True,
            prompt_bucket=generation.prompt_bucket,
        )
        st = generation._settings(
            vlm,
            host,
            4,
            prune=prune,
            sampling=Sampling(0.0, None, None),
            eos_token_id=None,
            keep_positions=False,
        )
        ids, mask, pixels, aux = device_arrays(host, vlm.mesh)
        args = (vlm.state, ids, pixels, mask, aux, jax.random.key(0))
        del towers[:]
        # A fresh partial: traced anew, never served from jit's trace cache.
        jax.make_jaxpr(functools.partial(decode._jit_prefill, vlm.graphdef, st=st))(*args)
        assert len(towers) == 1, (keep, len(towers))
        cost = decode.prefill_program.lower(vlm.graphdef, *args, st=st).compile().cost_analysis()
        flops[keep] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0 < flops[8] < flops[None], flops


def test_vision_markers_never_count_as_prompt_without_tokenizer_files(tiny, vlm, tmp_path):
    """A checkpoint with no tokenizer files (array-only use) still treats the config's vision
    start/end and video ids as special: the prompt vector never averages them."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(
        vlm.path,
        bare,
        ignore=shutil.ignore_patterns(
            "tokenizer*", "*token*map*", "vocab*", "merges*", "chat_template*", "*processor*"
        ),
    )
    arrays_only = zspa_jax.load(bare)
    assert arrays_only.processor is None
    cfg = arrays_only.config
    markers = {cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id}
    assert markers <= set(arrays_only.special_token_ids)
    assert cfg.image_token_id not in arrays_only.special_token_ids
    a = _np(hf_inputs(tiny.processor, [("what is this", 1)], [random_image(40, 56, seed=40)]))
    ids, mask = a["input_ids"], a["attention_mask"]
    assert np.isin(ids, list(markers)).any()  # the prompt holds a marker after the image
    for scope in ("question", "all_text"):
        counted = np.asarray(
            prompt_token_mask(ids, mask, cfg.image_token_id, arrays_only.special_token_ids, scope)
        )
        assert not counted[np.isin(ids, list(markers))].any()
