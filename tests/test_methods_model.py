"""Model-internal methods on a tiny random HF LLaVA: the tower's [CLS]-attention option and the
decoder's last-query attention row vs transformers' `output_attentions`; VisPruner,
VisionZip, CDPruner and core_ratio="auto" through forward/generate vs transformers fed
the same pruned inputs; FastV's pruned prefill and greedy decoding vs transformers with
the same tokens dropped at layer K (decoder layers hooked); bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zspa_jax
from models.layers import padding_causal_mask, positions_from_mask
from tests.support.drop_at_layer import DropAtLayer
from tests.support.torch_reference_dart import hf_llava_dart_kept
from tests.support.torch_reference_pruning import (
    cdpruner_reference,
    select_auto_reference,
    visionzip_reference,
    vispruner_reference,
)
from zspa_jax.pruning import PruneConfig

FASTV_LAYER = 2  # FastV's default K; the tiny decoder has 3 layers
KEEP = 6


@pytest.fixture(scope="module")
def tiny(tiny_hf_llava):
    return tiny_hf_llava("methods", text_layers=3)


@pytest.fixture(scope="module")
def vlm(tiny, converted):
    return zspa_jax.load(converted(tiny.path))


def _prompt(tiny, n_before: int, n_question: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(10, 290, size=n)  # noqa: E731
    return np.concatenate(
        [
            [tiny.bos_token_id],
            text(n_before),
            np.full(tiny.tokens_per_image, tiny.image_token_index),
            text(n_question),
        ]
    ).astype(np.int64)


def _pixels(tiny, count: int, seed: int) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((count, 3, tiny.image_size, tiny.image_size))
        .astype(np.float32)
    )


def _hf_tower(tiny, px: np.ndarray, layer: int):
    """HF tower internals at encoder layer `layer`: hidden state after it, [CLS] row (head mean), head-mean keys."""
    tower = tiny.hf.model.vision_tower
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
    heads = tower.config.num_attention_heads
    k = captured["k"]
    keys = k.view(k.shape[0], k.shape[1], heads, -1).mean(2)
    return out.hidden_states[layer + 1], out.attentions[layer][:, :, 0, :].mean(1), keys


def _feature_layer(tiny) -> int:
    """Encoder layer index that produces hidden_states[vision_feature_layer] (-2 -> layers - 2)."""
    return tiny.options["vision_feature_layer"] % (tiny.options["vision_layers"] + 1) - 1


def _embeds(tiny, ids):
    with torch.no_grad():
        return tiny.hf.get_input_embeddings()(
            torch.as_tensor(np.where(ids == tiny.image_token_index, 0, ids))
        )


def _hf_logits_with_visual(
    tiny, ids: np.ndarray, visual: torch.Tensor, positions=None
) -> np.ndarray:
    """HF logits for one row whose placeholder span is replaced by `visual` [K, D]."""
    start = int(np.flatnonzero(ids == tiny.image_token_index)[0])
    embeds = _embeds(tiny, ids)
    pruned = torch.cat([embeds[:start], visual, embeds[start + tiny.tokens_per_image :]])[None]
    kwargs = {} if positions is None else {"position_ids": torch.as_tensor(positions[None])}
    with torch.no_grad():
        return tiny.hf(inputs_embeds=pruned, **kwargs).logits.numpy()


# --------------------------------------------------------------------------- attention options


def test_cls_attention_option_equals_output_attentions(tiny, vlm, parity_record):
    px = _pixels(tiny, 2, seed=1)
    tower = vlm.model.vision_tower
    for layer in range(tiny.options["vision_layers"]):
        hidden, row, keys = _hf_tower(tiny, px, layer)
        states, cls = tower.hidden_states(px, cls_attention_layer=layer)
        assert cls.probs.shape == (2, tiny.tokens_per_image + 1)
        d = parity_record(
            "CLIP [CLS] attention row",
            f"layer {layer}",
            np.abs(np.asarray(cls.probs) - row.numpy()).max(),
            1e-6,
        )
        assert d <= 1e-6
        assert np.abs(np.asarray(cls.keys) - keys.numpy()).max() <= 1e-5
        assert np.abs(np.asarray(states[layer + 1]) - hidden.numpy()).max() <= 1e-4
        np.testing.assert_allclose(np.asarray(cls.probs).sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="cls_attention_layer"):
        tower.hidden_states(px, cls_attention_layer=tiny.options["vision_layers"])


@pytest.mark.slow
def test_decoder_attention_row_equals_output_attentions(tiny, vlm, parity_record):
    rows = [_prompt(tiny, 3, 9, seed=2), _prompt(tiny, 0, 5, seed=3)]
    width = max(map(len, rows))
    ids = np.full((2, width), tiny.pad_token_id, np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    px = _pixels(tiny, 2, seed=2)
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        out = tiny.hf(
            input_ids=torch.as_tensor(ids),
            pixel_values=torch.as_tensor(px),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
            output_attentions=True,
        )
    model = vlm.model
    embeds = model.inputs_embeds(ids, px)
    for layer in range(tiny.options["text_layers"]):
        ref = out.attentions[layer][:, :, -1, :].mean(1).numpy()
        x = embeds
        for i in range(
            layer + 1
        ):  # the layer's last-query attention row, as the LLM-stage methods read it
            x, _, *row = model.language_model.model.layers[i](
                x, positions, padding_causal_mask(mask), None, None, i == layer
            )
        row = row[0]
        d = parity_record(
            "LLaMA last-query attention row",
            f"layer {layer}",
            np.abs(np.asarray(row) - ref).max(),
            1e-6,
        )
        assert d <= 1e-6
        assert (np.asarray(row)[mask == 0] < 1e-12).all()  # padding gets no attention


# --------------------------------------------------------------------------- tower methods through the pipeline


@pytest.mark.slow
def test_vispruner_in_forward_matches_reference_and_transformers(tiny, vlm, parity_record):
    ids = _prompt(tiny, 4, 8, seed=4)[None]
    px = _pixels(tiny, 1, seed=4)
    for keep in (1, KEEP, tiny.tokens_per_image):
        logits, kept = zspa_jax.forward(
            vlm, ids, px, prune=PruneConfig(keep=keep, method="vispruner"), return_kept=True
        )
        hidden, row, _ = _hf_tower(tiny, px, _feature_layer(tiny))
        ref = vispruner_reference(hidden[:, 1:], row[:, 1:], keep=keep).numpy()
        np.testing.assert_array_equal(kept, ref)
        with torch.no_grad():
            visual = tiny.hf.model.multi_modal_projector(hidden[:, 1:])[0, torch.as_tensor(ref[0])]
        hf = _hf_logits_with_visual(tiny, ids[0], visual)
        d = parity_record(
            "vispruner prefill logits", f"keep={keep}", np.abs(logits - hf).max(), 1e-4
        )
        assert d <= 1e-4


@pytest.mark.parametrize("keep_positions", [False, True])
@pytest.mark.slow
def test_visionzip_in_forward_matches_reference_and_transformers(
    tiny, vlm, keep_positions, parity_record
):
    ids = _prompt(tiny, 5, 7, seed=5)[None]
    px = _pixels(tiny, 1, seed=5)
    # (keep = 6 with contiguous positions: the left-padded generation test below.)
    for keep in (1, tiny.tokens_per_image) if not keep_positions else (KEEP,):
        prune = PruneConfig(keep=keep, method="visionzip")
        logits, slots = zspa_jax.forward(
            vlm, ids, px, prune=prune, keep_positions=keep_positions, return_kept=True
        )
        hidden, row, keys = _hf_tower(tiny, px, _feature_layer(tiny))
        tokens, ref_slots = visionzip_reference(hidden, row, keys, keep=keep)
        np.testing.assert_array_equal(slots, ref_slots.numpy())
        with torch.no_grad():
            visual = tiny.hf.model.multi_modal_projector(tokens)[0]
        positions = None
        if keep_positions:
            start = int(np.flatnonzero(ids[0] == tiny.image_token_index)[0])
            n = tiny.tokens_per_image
            positions = np.concatenate(
                [np.arange(start), start + ref_slots[0].numpy(), np.arange(start + n, ids.shape[1])]
            )
        hf = _hf_logits_with_visual(tiny, ids[0], visual, positions)
        assert (
            logits.shape
            == hf.shape
            == (1, ids.shape[1] - tiny.tokens_per_image + keep, tiny.vocab_size)
        )
        d = parity_record(
            "visionzip prefill logits",
            f"keep={keep} keep_pos={keep_positions}",
            np.abs(logits - hf).max(),
            1e-4,
        )
        assert d <= 1e-4


@pytest.mark.slow
def test_prompt_methods_in_forward_match_references(tiny, vlm):
    rows = [_prompt(tiny, 4, 10, seed=6), _prompt(tiny, 2, 12, seed=7)]
    ids = np.stack(rows)
    px = _pixels(tiny, 2, seed=6)
    with torch.no_grad():
        feats = tiny.hf.model.get_image_features(
            pixel_values=torch.as_tensor(px), return_dict=True
        ).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    embeds = _embeds(tiny, ids)
    specials = {tiny.bos_token_id, tiny.pad_token_id, 2}
    question = np.zeros(ids.shape, bool)
    for b in range(2):
        last = np.flatnonzero(ids[b] == tiny.image_token_index)[-1]
        question[b, last + 1 :] = ~np.isin(ids[b, last + 1 :], list(specials))
    mask = torch.as_tensor(question)
    for prune, ref in [
        (
            PruneConfig(keep=KEEP, method="cdpruner"),
            lambda: cdpruner_reference(feats, embeds, mask, keep=KEEP),
        ),
        (
            PruneConfig(keep=KEEP, core_ratio="auto"),
            lambda: select_auto_reference(feats, embeds, mask, keep=KEEP)[0],
        ),
    ]:
        _, kept = zspa_jax.forward(vlm, ids, px, prune=prune, return_kept=True)
        np.testing.assert_array_equal(kept, ref().numpy(), err_msg=prune.method)


def test_tower_methods_refuse_a_tower_without_cls(tiny, vlm, monkeypatch):
    ids = _prompt(tiny, 1, 3, seed=8)[None]
    px = _pixels(tiny, 1, seed=8)
    monkeypatch.setattr(type(vlm.model.vision_tower), "has_cls_token", False)
    for method in ("vispruner", "visionzip"):
        with pytest.raises(
            ValueError,
            match=f"method '{method}' needs the vision tower's \\[CLS\\] attention.*no \\[CLS\\]",
        ):
            zspa_jax.forward(vlm, ids, px, prune=PruneConfig(keep=KEEP, method=method))


# --------------------------------------------------------------------------- inside the LLM: FastV, DART


def _hf_attention_row(tiny, ids, px, layer):
    with torch.no_grad():
        out = tiny.hf(
            input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px), output_attentions=True
        )
    return out.attentions[layer][:, :, -1, :].mean(1)  # [B, L]


def _hf_fastv_kept(tiny, ids, px, layer, keep) -> np.ndarray:
    """The reference choice: layer K-1's last-query attention to the image span, top `keep`, ties -> lower index."""
    row = _hf_attention_row(tiny, ids, px, layer - 1)
    start = int(np.flatnonzero(ids[0] == tiny.image_token_index)[0])
    scores = row[0, start : start + tiny.tokens_per_image]
    return np.sort(torch.sort(scores, descending=True, stable=True).indices[:keep].numpy())[None]


def _src(tiny, ids, kept) -> np.ndarray:
    start = int(np.flatnonzero(ids[0] == tiny.image_token_index)[0])
    n = tiny.tokens_per_image
    return np.concatenate([np.arange(start), start + kept[0], np.arange(start + n, ids.shape[1])])


# (method, seed, [(layer K, keep)]) for the prefill check; the greedy check uses K = 2, keep = KEEP.
IN_LLM_PREFILL = {
    "fastv": (9, [(1, 1), (FASTV_LAYER, None)]),
    "dart": (23, [(1, 5), (FASTV_LAYER, KEEP), (FASTV_LAYER, None)]),
}
IN_LLM_GREEDY_SEED = {"fastv": 10, "dart": 24}


def _in_llm_kept(method):
    return {"fastv": _hf_fastv_kept, "dart": hf_llava_dart_kept}[method]


@pytest.mark.parametrize("method", sorted(IN_LLM_PREFILL))
@pytest.mark.slow
def test_in_llm_prefill_logits_match_transformers_with_tokens_dropped(
    tiny, vlm, method, parity_record
):
    """Methods that prune inside the LLM: kept tokens equal the eager reference on transformers'
    own layer K-1 outputs, and the logits equal transformers with those tokens dropped at layer K."""
    seed, cases = IN_LLM_PREFILL[method]
    ids = _prompt(tiny, 6 if method == "fastv" else 5, 9, seed=seed)[None]
    px = _pixels(tiny, 1, seed=seed)
    for layer, keep in cases:
        keep = tiny.tokens_per_image if keep is None else keep
        prune = PruneConfig(keep=keep, method=method, layer=layer)
        logits, kept = zspa_jax.forward(vlm, ids, px, prune=prune, return_kept=True)
        np.testing.assert_array_equal(kept, _in_llm_kept(method)(tiny, ids, px, layer, keep))
        hooks = DropAtLayer(
            tiny.hf.model.language_model, layer, _src(tiny, ids, kept), ids.shape[1]
        )
        try:
            with torch.no_grad():
                ref = tiny.hf(
                    input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px)
                ).logits.numpy()
        finally:
            hooks.remove()
        assert (
            logits.shape
            == ref.shape
            == (1, ids.shape[1] - tiny.tokens_per_image + keep, tiny.vocab_size)
        )
        d = parity_record(
            f"{method} pruned prefill logits",
            f"K={layer} keep={keep}",
            np.abs(logits - ref).max(),
            1e-4,
        )
        assert d <= 1e-4


@pytest.mark.parametrize("method", sorted(IN_LLM_GREEDY_SEED))
@pytest.mark.slow
def test_in_llm_greedy_generation_matches_transformers_with_tokens_dropped(tiny, vlm, method):
    seed = IN_LLM_GREEDY_SEED[method]
    ids = _prompt(tiny, 3 if method == "fastv" else 4, 10 if method == "fastv" else 8, seed=seed)[
        None
    ]
    px = _pixels(tiny, 1, seed=seed)
    prune = PruneConfig(keep=KEEP, method=method)
    ours = zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, prune=prune, max_new_tokens=12, eos_token_id=[]
    )
    kwargs = dict(
        max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tiny.pad_token_id
    )
    hooks = DropAtLayer(
        tiny.hf.model.language_model, FASTV_LAYER, _src(tiny, ids, ours.kept_indices), ids.shape[1]
    )
    try:
        with torch.no_grad():
            ref = tiny.hf.generate(
                input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px), **kwargs
            ).numpy()
    finally:
        hooks.remove()
    np.testing.assert_array_equal(ours.sequences, ref[:, ids.shape[1] :])
    with torch.no_grad():  # the hooks matter: without them transformers answers differently
        plain = tiny.hf.generate(
            input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px), **kwargs
        ).numpy()
    assert not np.array_equal(plain[:, ids.shape[1] :], ref[:, ids.shape[1] :])
    np.testing.assert_array_equal(
        ours.kept_indices, _in_llm_kept(method)(tiny, ids, px, FASTV_LAYER, KEEP)
    )


def test_fastv_bad_input(tiny, vlm):
    ids = _prompt(tiny, 1, 3, seed=11)[None]
    px = _pixels(tiny, 1, seed=11)
    n_layers = tiny.options["text_layers"]
    for layer in (0, -1):  # below the option's range: refused by the config itself
        with pytest.raises(ValueError, match="'fastv': option layer must be an integer >= 1"):
            PruneConfig(keep=KEEP, method="fastv", layer=layer)
    prune = PruneConfig(keep=KEEP, method="fastv", layer=n_layers)  # the model's bound
    with pytest.raises(ValueError, match=f"'fastv': layer K={n_layers} is outside the decoder"):
        zspa_jax.forward(vlm, ids, px, prune=prune)
    with pytest.raises(ValueError, match="outside the decoder"):
        zspa_jax.generate(vlm, input_ids=ids, pixel_values=px, max_new_tokens=2, prune=prune)
    too_many = tiny.tokens_per_image + 1
    for method in ("fastv", "vispruner", "visionzip", "cdpruner"):
        with pytest.raises(
            ValueError,
            match=f"keep={too_many} exceeds.*n_visual={tiny.tokens_per_image}.*'{method}'",
        ):
            zspa_jax.forward(vlm, ids, px, prune=PruneConfig(keep=too_many, method=method))


def test_cls_methods_need_one_feature_layer_produced_by_attention(tiny, vlm):
    import dataclasses

    from models.llava import cls_feature_state
    from zspa_jax.families import family_of

    assert (
        cls_feature_state(vlm.config, vlm.model.vision_tower) == tiny.options["vision_layers"] - 1
    )  # -2
    assert vlm.model.cls_feature_index() == tiny.options["vision_layers"] - 1
    for layers, reason in [((-2, -3), "several feature layers"), (0, "embeddings")]:
        cfg = dataclasses.replace(vlm.config, vision_feature_layer=layers)
        with pytest.raises(ValueError, match=reason):  # the model says why, naming no method
            cls_feature_state(cfg, vlm.model.vision_tower)
        model = type(
            "Model",
            (),
            {"cls_feature_index": lambda self, c=cfg: cls_feature_state(c, vlm.model.vision_tower)},
        )()
        for method in ("vispruner", "visionzip"):  # the family record names the method
            with pytest.raises(ValueError, match=f"method '{method}'.*{reason}"):
                family_of(vlm).check_method(PruneConfig(keep=KEEP, method=method), model)


@pytest.mark.slow
def test_visionzip_generate_left_padded_batch_matches_transformers(tiny, vlm):
    # Merged tokens land in each row's own span (different starts under left padding).
    rows = [_prompt(tiny, 2, 6, seed=12), _prompt(tiny, 7, 9, seed=13)]
    width = max(map(len, rows))
    ids = np.full((2, width), tiny.pad_token_id, np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    px = _pixels(tiny, 2, seed=12)
    out = zspa_jax.generate(
        vlm,
        input_ids=ids,
        pixel_values=px,
        attention_mask=mask,
        prune=PruneConfig(keep=KEEP, method="visionzip"),
        max_new_tokens=8,
        eos_token_id=[],
    )
    hidden, row, keys = _hf_tower(tiny, px, _feature_layer(tiny))
    tokens, slots = visionzip_reference(hidden, row, keys, keep=KEEP)
    np.testing.assert_array_equal(out.kept_indices, slots.numpy())
    with torch.no_grad():
        visual = tiny.hf.model.multi_modal_projector(tokens)
    embeds = _embeds(tiny, ids)
    pruned, pruned_mask = [], []
    for b in range(2):
        start = int(np.flatnonzero(ids[b] == tiny.image_token_index)[0])
        end = start + tiny.tokens_per_image
        pruned.append(torch.cat([embeds[b, :start], visual[b], embeds[b, end:]]))
        pruned_mask.append(
            np.concatenate([mask[b, :start], np.ones(KEEP, np.int64), mask[b, end:]])
        )
    with torch.no_grad():
        ref = tiny.hf.generate(
            inputs_embeds=torch.stack(pruned),
            attention_mask=torch.as_tensor(np.stack(pruned_mask)),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
        ).numpy()
    np.testing.assert_array_equal(out.sequences, ref)


# --------------------------------------------------------------------------- pool


# One case in the fast tier: merged tokens at original positions, where a token's RoPE
# position comes from its window-centre slot and not from where it is placed (its anchor).
@pytest.mark.parametrize(
    "keep_positions, keeps",
    [
        pytest.param(True, (4,), id="original_positions-keep4"),
        pytest.param(True, (6,), id="original_positions-keep6", marks=pytest.mark.slow),
        pytest.param(False, (4, 6), id="renumbered", marks=pytest.mark.slow),
    ],
)
def test_pool_in_forward_matches_adaptive_avg_pool_and_transformers(
    tiny, vlm, keep_positions, keeps, parity_record
):
    """The pooled tokens (torch's adaptive_avg_pool2d over the projected token grid) at their
    window-centre slots: logits equal transformers fed those embeddings at those positions."""
    from tests.support.torch_reference_pool import pool_reference

    ids = _prompt(tiny, 3, 6, seed=21)[None]
    px = _pixels(tiny, 1, seed=21)
    side = tiny.image_size // tiny.options["patch_size"]
    for keep in keeps:  # 4, 6: 2 x 2 and 2 x 3 windows of the side x side grid
        logits, slots = zspa_jax.forward(
            vlm,
            ids,
            px,
            prune=PruneConfig(keep=keep, method="pool"),
            keep_positions=keep_positions,
            return_kept=True,
        )
        with torch.no_grad():
            projected = tiny.hf.model.get_image_features(
                pixel_values=torch.as_tensor(px)
            ).pooler_output
            projected = projected[0] if isinstance(projected, (list, tuple)) else projected
            projected = projected.reshape(1, -1, projected.shape[-1])
        tokens, ref_slots = pool_reference(projected, [(side, side)], keep)
        np.testing.assert_array_equal(slots, ref_slots.numpy())
        positions = None
        if keep_positions:
            start = int(np.flatnonzero(ids[0] == tiny.image_token_index)[0])
            n = tiny.tokens_per_image
            positions = np.concatenate(
                [np.arange(start), start + ref_slots[0].numpy(), np.arange(start + n, ids.shape[1])]
            )
        hf = _hf_logits_with_visual(tiny, ids[0], tokens[0], positions)
        assert (
            logits.shape
            == hf.shape
            == (1, ids.shape[1] - tiny.tokens_per_image + keep, tiny.vocab_size)
        )
        d = parity_record(
            "pool prefill logits",
            f"keep={keep} keep_pos={keep_positions}",
            np.abs(logits - hf).max(),
            1e-4,
        )
        assert d <= 1e-4


def test_pool_refuses_a_keep_no_grid_shape_fits(tiny, vlm):
    ids = _prompt(tiny, 1, 3, seed=22)[None]
    px = _pixels(tiny, 1, seed=22)
    side = tiny.image_size // tiny.options["patch_size"]
    prime = next(p for p in range(side + 1, side * side) if all(p % q for q in range(2, p)))
    with pytest.raises(ValueError, match=f"keep={prime}"):
        zspa_jax.forward(vlm, ids, px, prune=PruneConfig(keep=prime, method="pool"))
