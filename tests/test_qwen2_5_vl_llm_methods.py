"""FastV and DART (pruning inside the LLM) on Qwen2.5-VL against transformers, with rows of
different image sizes in one left-padded batch (ragged rows: the smaller image's span is
padded with masked slots).

For each row, transformers' Qwen2_5_VLForConditionalGeneration runs that row alone with
forward pre-hooks on decoder layers >= K that drop the pruned visual tokens (hidden states,
M-RoPE cos/sin, text position ids and mask; decode steps: the mask columns the layer's
cache lacks). The kept indices equal independent references on transformers' own layer
K-1 internals (FastV: the head-mean last-query attention from `output_attentions`; DART:
`tests/support/torch_reference_dart.py` on its output hidden states and its keys after M-RoPE).
Checked: the pruned prefill logits at each row's real positions, greedy generation, and
that each row of the ragged batch equals the row run alone through zspa_jax (tests/test_families.py).

The tiny model has 3 decoder layers (K = 2 needs layers after it; the default tiny has 2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zspa_jax
from tests.support.drop_at_layer import QwenDropAtLayer, qwen_layer_internals
from tests.support.tiny_qwen2_5_vl import converted, hf_inputs, random_image, tiny_model
from zspa_jax import PruneConfig

BOUND = 1e-4  # as tests/test_methods_model.py's in-LLM prefill check (f32)
LAYER = 2  # K: FastV's and DART's default
TEXT_LAYERS = 3
KEEP = 6
NEW_TOKENS = 8
METHODS = ("dart", "fastv")

# Row 0: a 5 x 7 merged-token image (35 tokens) and a short question; row 1: 3 x 4 (12
# tokens) and a longer question, so both the token count and the left padding differ.
PROMPTS = [("what color is the cat", 1), ("describe the small dog on the left of the table", 1)]
SIZES = [(40, 56), (24, 32)]
IMAGE_SEEDS = {"fastv": (90, 91), "dart": (92, 93)}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(text_layers=TEXT_LAYERS)


@pytest.fixture(scope="module")
def vlm(tiny):
    return zspa_jax.load(converted(tiny))


def _images(method):
    return [random_image(h, w, seed=s) for (h, w), s in zip(SIZES, IMAGE_SEEDS[method])]


def _np(batch):
    return {k: v.numpy() for k, v in batch.items()}


def _batch(tiny, method):
    """The ragged, left-padded two-row batch (torch) and each row alone (torch)."""
    images = _images(method)
    batch = hf_inputs(tiny.processor, PROMPTS, images)
    rows = [hf_inputs(tiny.processor, [p], [im]) for p, im in zip(PROMPTS, images)]
    counts = [int((r["input_ids"] == tiny.image_token_id).sum()) for r in rows]
    assert counts[0] != counts[1], "the rows should carry different numbers of visual tokens"
    mask = batch["attention_mask"].numpy()
    assert (mask == 0).any(), "the batch should be left-padded"
    return batch, rows


def _zspa_args(a):
    return dict(
        input_ids=a["input_ids"],
        pixel_values=a["pixel_values"],
        attention_mask=a["attention_mask"],
        image_grid_thw=a["image_grid_thw"],
    )


def _span(tiny, row) -> tuple[int, int]:
    """(first slot, length) of the row-alone batch's image span."""
    where = torch.nonzero(row["input_ids"][0] == tiny.image_token_id)[:, 0]
    assert (where == where[0] + torch.arange(len(where))).all()
    return int(where[0]), len(where)


def _question_mask(tiny, ids: torch.Tensor) -> torch.Tensor:
    """bool [1, L] of a row alone: after the image span, not a special token of the tokenizer
    (the DART text pivots' candidates, as PruneConfig's default prompt_scope="question")."""
    tok = tiny.processor.tokenizer
    special = set(tok.all_special_ids) | {tok.pad_token_id, tok.eos_token_id}
    special.discard(tiny.image_token_id)
    ids = ids[0]
    last = int(torch.nonzero(ids == tiny.image_token_id)[:, 0].max())
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for j in range(last + 1, len(ids)):
        out[j] = int(ids[j]) not in special
    return out[None]


def _reference_kept(tiny, method, row, layer, keep) -> np.ndarray:
    """The kept visual tokens of one row alone, from transformers' layer K-1 (ascending)."""
    start, n = _span(tiny, row)
    attention, keys, hidden = qwen_layer_internals(tiny, row, layer - 1)
    if method == "fastv":
        scores = attention[start : start + n]
        return np.sort(torch.sort(scores, descending=True, stable=True).indices[:keep].numpy())
    from tests.support.torch_reference_dart import dart_select_reference

    with torch.no_grad():
        kept = dart_select_reference(
            hidden[None],
            keys[None],
            torch.tensor([start]),
            _question_mask(tiny, row["input_ids"]),
            num_visual=n,
            keep=keep,
            norm_weight=tiny.hf.model.language_model.norm.weight,
        )
    return kept.numpy()[0]


def _src(tiny, row, kept) -> np.ndarray:
    """Positions of the row alone that layers >= K keep."""
    start, n = _span(tiny, row)
    length = row["input_ids"].shape[1]
    assert kept.shape == (KEEP,) and (np.diff(kept) > 0).all() and kept.max() < n
    return np.concatenate([np.arange(start), start + kept, np.arange(start + n, length)])


def _hooked(tiny, row, kept):
    return QwenDropAtLayer(
        tiny.hf.model.language_model, LAYER, _src(tiny, row, kept), row["input_ids"].shape[1]
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_prefill_on_ragged_rows_matches_transformers_with_tokens_dropped(
    tiny, vlm, method, parity_record
):
    batch, rows = _batch(tiny, method)
    prune = PruneConfig(keep=KEEP, method=method, layer=LAYER)
    logits, kept, out_mask = zspa_jax.forward(
        vlm, **_zspa_args(_np(batch)), prune=prune, return_kept=True, return_mask=True
    )
    assert kept.shape == (2, KEEP)
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(
            kept[r], _reference_kept(tiny, method, row, LAYER, KEEP), err_msg=f"row {r}"
        )
        hooks = _hooked(tiny, row, kept[r])
        try:
            with torch.no_grad():
                ref = tiny.hf(**row).logits[0].numpy()
        finally:
            hooks.remove()
        assert hooks.calls == {"prefill": TEXT_LAYERS - LAYER, "decode": 0}
        _, n = _span(tiny, row)
        assert ref.shape[0] == row["input_ids"].shape[1] - n + KEEP
        got = logits[r][out_mask[r].astype(bool)]
        assert got.shape == ref.shape
        d = parity_record(
            f"qwen {method} pruned prefill logits",
            f"K={LAYER} keep={KEEP} row {r} (N={n})",
            float(np.abs(got - ref).max()),
            BOUND,
            scale=float(np.abs(ref).max()),
        )
        assert d <= BOUND, (r, d)
        with torch.no_grad():  # the hooks matter: transformers without them differs by far more
            plain = tiny.hf(**row).logits[0, -1].numpy()
        assert np.abs(plain - ref[-1]).max() > 100 * BOUND


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_greedy_on_ragged_rows_matches_transformers_with_tokens_dropped(tiny, vlm, method):
    batch, rows = _batch(tiny, method)
    prune = PruneConfig(keep=KEEP, method=method, layer=LAYER)
    res = zspa_jax.generate(
        vlm, **_zspa_args(_np(batch)), prune=prune, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    )
    assert res.sequences.shape == (2, NEW_TOKENS)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    differs = []
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(
            res.kept_indices[r], _reference_kept(tiny, method, row, LAYER, KEEP)
        )
        length = row["input_ids"].shape[1]
        hooks = _hooked(tiny, row, res.kept_indices[r])
        try:
            with torch.no_grad():
                ref = tiny.hf.generate(**row, **kwargs)[0, length:].numpy()
        finally:
            hooks.remove()
        assert hooks.calls == {
            "prefill": TEXT_LAYERS - LAYER,
            "decode": (TEXT_LAYERS - LAYER) * (NEW_TOKENS - 1),
        }
        np.testing.assert_array_equal(res.sequences[r], ref, err_msg=f"row {r}")
        with torch.no_grad():
            plain = tiny.hf.generate(**row, **kwargs)[0, length:].numpy()
        differs.append(not np.array_equal(plain, ref))
    assert any(differs), (
        "without the hooks transformers answers the same: this check proves nothing"
    )
