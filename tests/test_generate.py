"""zspa_jax.generate vs transformers: greedy tokens, pruned prefill, kept indices, sampling,
compile counts, streaming, jit-ability and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import zspa_jax
from tests.support.torch_reference_pruning import select_tokens_reference
from zspa_jax import generation
from zspa_jax.host import round_up
from zspa_jax.pruning import PruneConfig

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny(tiny_hf_llava):
    return tiny_hf_llava("gen")


@pytest.fixture(scope="module")
def vlm(tiny, converted):
    return zspa_jax.load(converted(tiny.path))


def _prompt(tiny, n_text_before: int, n_question: int, seed: int) -> np.ndarray:
    """BOS, text, the image placeholder span, then a question (random non-special ids)."""
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(10, 290, size=n)
    return np.concatenate(
        [
            [tiny.bos_token_id],
            text(n_text_before),
            np.full(tiny.tokens_per_image, tiny.image_token_index),
            text(n_question),
        ]
    ).astype(np.int64)


def _pixels(tiny, count: int, seed: int) -> np.ndarray:
    size = tiny.image_size
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def _left_pad(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _hf_generate(tiny, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = tiny.hf.generate(
            **{k: torch.as_tensor(v) for k, v in kwargs.items()},
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
        )
    return out.numpy()


def test_unpruned_greedy_matches_transformers_single(tiny, vlm):
    ids = _prompt(tiny, 5, 9, seed=1)[None]
    px = _pixels(tiny, 1, seed=1)
    ours = zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    )
    ref = _hf_generate(tiny, input_ids=ids, pixel_values=px)[:, ids.shape[1] :]
    assert ours.sequences.shape == (1, NEW_TOKENS)
    np.testing.assert_array_equal(ours.sequences, ref)


@pytest.mark.slow
def test_unpruned_greedy_left_padded_batch_matches_per_example(tiny, vlm):
    rows = [_prompt(tiny, 3, 4, seed=2), _prompt(tiny, 11, 12, seed=3), _prompt(tiny, 0, 7, seed=4)]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    px = _pixels(tiny, 3, seed=5)
    ours = zspa_jax.generate(
        vlm,
        input_ids=ids,
        pixel_values=px,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=[],
    )
    for i, row in enumerate(rows):
        ref = _hf_generate(tiny, input_ids=row[None], pixel_values=px[i : i + 1])[:, len(row) :]
        np.testing.assert_array_equal(ours.sequences[i : i + 1], ref, err_msg=f"row {i}")


@pytest.mark.slow
def test_eos_stops_rows_like_transformers(tiny, vlm):
    ids = _prompt(tiny, 5, 9, seed=1)[None]
    px = _pixels(tiny, 1, seed=1)
    free = zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    )
    eos = int(free.sequences[0, 5])  # a token the model emits mid-way
    stop_at = int(np.flatnonzero(free.sequences[0] == eos)[0])
    ours = zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, max_new_tokens=NEW_TOKENS, eos_token_id=eos
    )
    with torch.no_grad():
        ref = tiny.hf.generate(
            input_ids=torch.as_tensor(ids),
            pixel_values=torch.as_tensor(px),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tiny.pad_token_id,
        ).numpy()[:, ids.shape[1] :]
    assert ours.sequences.shape[1] == stop_at + 1 == ref.shape[1]
    np.testing.assert_array_equal(ours.sequences, ref)
    assert ours.stats["new_tokens_total"] == stop_at + 1 and ours.stats["new_tokens_per_row"] == [
        stop_at + 1
    ]


# --- batched stopping: rows that hit EOS at different steps ------------------------------------

_STOP_ROWS = [(3, 4, 21), (11, 12, 22), (0, 7, 23), (6, 2, 24)]  # (text before, question, seed)


def _stop_batch(tiny):
    rows = [_prompt(tiny, a, q, seed=s) for a, q, s in _STOP_ROWS]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    return rows, ids, mask, _pixels(tiny, len(rows), seed=25)


def _first_steps(free: list[np.ndarray], token: int) -> list[int | None]:
    """Step at which each row's free-running greedy output first emits `token` (None: never)."""
    return [int(np.flatnonzero(f == token)[0]) if (f == token).any() else None for f in free]


def _staggered_eos(free: list[np.ndarray]) -> list[int]:
    """Two EOS ids, taken from the reference's own greedy outputs, that stop the rows at
    pairwise different steps, the first stop early enough that other rows run on for at
    least 2 more steps (a finished row must stay finished while the loop continues); each
    id is the one that stops at least one row. Prefers a row that never stops."""
    candidates = sorted({int(t) for f in free for t in f[: NEW_TOKENS - 3]})
    combos = [[a, b] for a in candidates for b in candidates if a < b]
    best = None
    for combo in combos:
        steps, stoppers = [], set()
        for f in free:
            hits = {t: s for t in combo for s in _first_steps([f], t) if s is not None}
            if hits:
                t = min(hits, key=hits.get)
                steps.append(hits[t] + 1)  # tokens generated, EOS included
                stoppers.add(t)
            else:
                steps.append(NEW_TOKENS)  # never stops: runs to the limit
        if (
            len(set(steps)) < len(steps)
            or max(steps) - min(steps) < 2
            or len(stoppers) < len(combo)
        ):
            continue
        score = (NEW_TOKENS in steps, max(steps) - min(steps))
        if best is None or score > best[0]:
            best = (score, combo)
    assert best is not None, "no EOS choice staggers these rows; change _STOP_ROWS"
    return best[1]


def _hf_generate_until(tiny, row: np.ndarray, px: np.ndarray, eos: list[int]) -> np.ndarray:
    """transformers' greedy generate for one unpadded row, stopping at `eos`: the new tokens."""
    with torch.no_grad():
        out = tiny.hf.generate(
            input_ids=torch.as_tensor(row[None]),
            pixel_values=torch.as_tensor(px[None]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tiny.pad_token_id,
        )
    return out.numpy()[0, len(row) :]


@pytest.mark.slow
def test_batched_rows_stop_at_different_steps_like_transformers_per_row(tiny, vlm):
    """A left-padded batch whose rows hit EOS at different steps (two EOS ids, each the one
    that stops some row; one row may never stop): each row's tokens up to and including its
    EOS equal transformers' generate run on that row alone, then only pad; lengths and the
    stats count agree; streaming yields the same tokens."""
    rows, ids, mask, px = _stop_batch(tiny)
    free = [
        _hf_generate(tiny, input_ids=r[None], pixel_values=px[i : i + 1])[0, len(r) :]
        for i, r in enumerate(rows)
    ]
    eos = _staggered_eos(free)
    refs = [_hf_generate_until(tiny, r, px[i], eos) for i, r in enumerate(rows)]
    ref_lengths = np.array([len(r) for r in refs])
    # The scenario really is staggered: distinct stops, an unfinished row keeps going after the first stop.
    assert len(set(ref_lengths.tolist())) == len(rows), ref_lengths
    assert ref_lengths.max() - ref_lengths.min() >= 2, ref_lengths
    print(f"eos {eos}: per-row lengths {ref_lengths.tolist()}")
    for ref, n in zip(refs, ref_lengths):
        assert n == NEW_TOKENS or ref[-1] in eos

    kw = dict(
        input_ids=ids,
        pixel_values=px,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
    )
    ours = zspa_jax.generate(vlm, **kw)
    assert ours.sequences.shape == (len(rows), ref_lengths.max())
    for i, (ref, n) in enumerate(zip(refs, ref_lengths)):
        np.testing.assert_array_equal(
            ours.sequences[i, :n], ref, err_msg=f"row {i}: tokens up to EOS"
        )
        assert (ours.sequences[i, n:] == vlm.pad_token_id).all(), (
            f"row {i} after EOS: {ours.sequences[i, n:]}"
        )
    assert ours.stats["new_tokens_per_row"] == ref_lengths.tolist()
    assert ours.stats["new_tokens_total"] == ref_lengths.sum()
    assert ours.texts is not None and len(ours.texts) == len(rows)

    # generate_tokens: the same tokens, exact per-row lengths, pad to the end of its buffer.
    # (Left-padded to generate's prompt bucket, so it reuses generate's compiled programs.)
    extra = generation.prompt_bucket(ids.shape[1]) - ids.shape[1]
    padded_ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=tiny.pad_token_id)
    padded_mask = np.pad(mask, ((0, 0), (extra, 0)))
    out = zspa_jax.generate_tokens(
        vlm,
        jnp.asarray(padded_ids, jnp.int32),
        jnp.asarray(px),
        jnp.asarray(padded_mask, jnp.int32),
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
    )
    np.testing.assert_array_equal(np.asarray(out.lengths), ref_lengths)
    tokens = np.asarray(out.tokens)
    for i, (ref, n) in enumerate(zip(refs, ref_lengths)):
        np.testing.assert_array_equal(tokens[i, :n], ref, err_msg=f"generate_tokens row {i}")
        assert (tokens[i, n:] == vlm.pad_token_id).all(), (
            f"generate_tokens row {i} after EOS: {tokens[i, n:NEW_TOKENS]}"
        )

    # Streaming: one chunk per step until every row has stopped, pad for finished rows.
    chunks = list(zspa_jax.generate(vlm, stream=True, **kw))
    assert len(chunks) == ref_lengths.max()
    np.testing.assert_array_equal(np.stack(chunks, axis=1), ours.sequences)


def _hf_pieces(tiny, ids: np.ndarray, px: np.ndarray):
    """The HF model's own projected visual tokens [B, N, D] and input-embedding rows [B, L, D]."""
    hf = tiny.hf
    with torch.no_grad():
        feats = hf.model.get_image_features(
            pixel_values=torch.as_tensor(px), return_dict=True
        ).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        text_ids = torch.as_tensor(np.where(ids == tiny.image_token_index, 0, ids))
        embeds = hf.get_input_embeddings()(text_ids)
    return feats, embeds


def _question_mask(tiny, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    specials = {tiny.bos_token_id, tiny.pad_token_id, 2}
    out = np.zeros(ids.shape, bool)
    for b in range(ids.shape[0]):
        last_image = np.flatnonzero(ids[b] == tiny.image_token_index)[-1]
        for j in range(last_image + 1, ids.shape[1]):
            out[b, j] = mask[b, j] == 1 and int(ids[b, j]) not in specials
    return out


def _pruned_hf_inputs(tiny, ids, mask, feats, embeds, kept):
    """What a transformers user feeds after pruning: kept tokens replace the placeholders."""
    rows, masks = [], []
    for b in range(ids.shape[0]):
        start = int(np.flatnonzero(ids[b] == tiny.image_token_index)[0])
        end = start + tiny.tokens_per_image
        rows.append(
            torch.cat([embeds[b, :start], feats[b, torch.as_tensor(kept[b])], embeds[b, end:]])
        )
        masks.append(
            np.concatenate([mask[b, :start], np.ones(kept.shape[1], np.int64), mask[b, end:]])
        )
    return torch.stack(rows), torch.as_tensor(np.stack(masks))


@pytest.mark.parametrize("scope", ["question", "all_text"])
@pytest.mark.slow
def test_pruned_generation_matches_transformers_on_pruned_embeds(tiny, vlm, scope):
    rows = [_prompt(tiny, 4, 10, seed=6), _prompt(tiny, 9, 6, seed=7)]
    ids, mask = _left_pad(rows, tiny.pad_token_id)
    px = _pixels(tiny, 2, seed=8)
    prune = PruneConfig(keep=5, core_ratio=0.6, prompt_scope=scope)
    ours = zspa_jax.generate(
        vlm,
        input_ids=ids,
        pixel_values=px,
        attention_mask=mask,
        prune=prune,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=[],
    )

    # Kept indices == the eager PyTorch reference on the HF model's own features and embeddings.
    feats, embeds = _hf_pieces(tiny, ids, px)
    if scope == "question":
        prompt_mask = _question_mask(tiny, ids, mask)
    else:
        prompt_mask = (
            (mask == 1)
            & (ids != tiny.image_token_index)
            & ~np.isin(ids, [tiny.bos_token_id, tiny.pad_token_id, 2])
        )
    ref_kept = select_tokens_reference(
        feats, embeds, torch.as_tensor(prompt_mask), keep=5, core_ratio=0.6
    ).numpy()
    np.testing.assert_array_equal(ours.kept_indices, ref_kept)

    # Greedy tokens == transformers fed the same pruned inputs_embeds.
    pruned, pruned_mask = _pruned_hf_inputs(tiny, ids, mask, feats, embeds, ours.kept_indices)
    with torch.no_grad():
        ref = tiny.hf.generate(
            inputs_embeds=pruned,
            attention_mask=pruned_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
        ).numpy()
    np.testing.assert_array_equal(ours.sequences, ref)
    assert ours.stats["visual_tokens_kept_per_image"] == 5
    assert ours.stats["prompt_tokens_per_row_pruned"] == [
        n - tiny.tokens_per_image + 5 for n in ours.stats["prompt_tokens_per_row"]
    ]


@pytest.mark.parametrize("keep_positions", [False, True])
def test_pruned_prefill_logits_match_transformers(tiny, vlm, keep_positions, parity_record):
    ids = _prompt(tiny, 6, 12, seed=9)[None]
    px = _pixels(tiny, 1, seed=9)
    prune = PruneConfig(keep=6)
    logits, kept = zspa_jax.forward(
        vlm, ids, px, prune=prune, keep_positions=keep_positions, return_kept=True
    )
    feats, embeds = _hf_pieces(tiny, ids, px)
    pruned, pruned_mask = _pruned_hf_inputs(tiny, ids, np.ones_like(ids), feats, embeds, kept)
    kwargs = {}
    if keep_positions:
        start = int(np.flatnonzero(ids[0] == tiny.image_token_index)[0])
        n = tiny.tokens_per_image
        pos = np.concatenate(
            [np.arange(start), start + kept[0], np.arange(start + n, ids.shape[1])]
        )
        kwargs["position_ids"] = torch.as_tensor(pos[None])
    with torch.no_grad():
        ref = tiny.hf(inputs_embeds=pruned, attention_mask=pruned_mask, **kwargs).logits.numpy()
    assert (
        logits.shape == ref.shape == (1, ids.shape[1] - tiny.tokens_per_image + 6, tiny.vocab_size)
    )
    diff = parity_record(
        "pruned prefill logits",
        f"keep_positions={keep_positions}",
        np.abs(logits - ref).max(),
        1e-4,
    )
    assert diff <= 1e-4


def test_decode_step_logits_match_transformers(tiny, vlm, parity_record):
    # Each decode step's next-token logits (one query over the cache: models.llama's
    # decode_attention) against transformers' full forward over the prompt + tokens so far.
    from zspa_jax.batch import device_arrays, prepare_arrays
    from zspa_jax.decode import prefill_program, step_program
    from zspa_jax.sampling import Sampling

    ids = _prompt(tiny, 5, 9, seed=7)[None]
    px = _pixels(tiny, 1, seed=7)
    steps = 6
    host = prepare_arrays(vlm, ids, px, None, {}, None, extra_length=steps, bucket=True)
    st = generation._settings(
        vlm, host, steps, prune=None, sampling=Sampling(), eos_token_id=[], keep_positions=False
    )
    input_ids, mask, pixels, aux = device_arrays(host, vlm.mesh)
    s, _ = prefill_program(
        vlm.graphdef, vlm.state, input_ids, pixels, mask, aux, jax.random.key(0), st
    )
    worst = 0.0
    for t in range(1, steps + 1):
        s = step_program(vlm.graphdef, vlm.state, s, st)
        tokens = np.asarray(s.tokens[:, :t])
        with torch.no_grad():
            ref = (
                tiny.hf(
                    input_ids=torch.as_tensor(np.concatenate([ids, tokens], 1)),
                    pixel_values=torch.as_tensor(px),
                )
                .logits[:, -1]
                .numpy()
            )
        worst = max(worst, float(np.abs(np.asarray(s.logits) - ref).max()))
    diff = parity_record(
        "decode step logits", f"{steps} steps, cache {st.cache_length}", worst, 1e-4
    )
    assert diff <= 1e-4


@pytest.mark.slow
def test_sampling_is_reproducible_for_a_seed(vlm, tiny):
    ids = _prompt(tiny, 5, 9, seed=1)[None]
    px = _pixels(tiny, 1, seed=1)
    kw = dict(
        input_ids=ids,
        pixel_values=px,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=[],
        temperature=1.5,
        top_k=50,
        top_p=0.95,
    )
    a = zspa_jax.generate(vlm, seed=3, **kw).sequences
    b = zspa_jax.generate(vlm, seed=3, **kw).sequences
    c = zspa_jax.generate(vlm, seed=4, **kw).sequences
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    ).sequences
    assert not np.array_equal(a, greedy)


@pytest.mark.slow
def test_top_k_one_is_greedy(vlm, tiny):
    ids = _prompt(tiny, 5, 9, seed=1)[None]
    px = _pixels(tiny, 1, seed=1)
    kw = dict(input_ids=ids, pixel_values=px, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    sampled = zspa_jax.generate(vlm, temperature=2.0, top_k=1, seed=7, **kw).sequences
    np.testing.assert_array_equal(sampled, zspa_jax.generate(vlm, **kw).sequences)


@pytest.mark.slow
def test_same_bucket_does_not_recompile(vlm, tiny):
    px = _pixels(tiny, 1, seed=10)
    prune = PruneConfig(keep=4)
    call = lambda ids, n: zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, prune=prune, max_new_tokens=n, eos_token_id=[]
    )
    first = call(_prompt(tiny, 2, 5, seed=11)[None], 5)
    before = dict(generation.TRACE_COUNTS)
    # Another prompt length in the same prompt bucket, another max_new_tokens in the same cache bucket.
    out = call(_prompt(tiny, 7, 3, seed=12)[None], 11)
    assert out.sequences.shape == (1, 11)
    assert out.stats["cache_length"] == first.stats["cache_length"]
    assert dict(generation.TRACE_COUNTS) == before


def test_prompt_bucket_ladder():
    """Prompt lengths pad to a ladder: at most 15 slots up to 256 tokens, under 1/8 of the
    prompt beyond, never more than 64-token steps; idempotent and monotone; 48 buckets up
    to 2048 tokens."""
    lengths = np.arange(1, 4097)
    padded = np.array([generation.prompt_bucket(n) for n in lengths])
    assert (padded >= lengths).all() and (np.diff(padded) >= 0).all()
    assert all(generation.prompt_bucket(p) == p for p in padded)
    assert (padded <= 64 * np.ceil(lengths / 64)).all()  # never above the 64-token step
    assert (padded[:256] - lengths[:256] <= 15).all()
    assert ((padded - lengths)[128:] < lengths[128:] / 8).all()
    assert len(set(padded[:2048].tolist())) == 48
    assert [generation.prompt_bucket(n) for n in (64, 65, 76, 257, 268, 513, 1268)] == [
        64,
        80,
        80,
        288,
        288,
        576,
        1280,
    ]


@pytest.mark.slow
def test_stream_yields_the_same_tokens(vlm, tiny):
    ids = _prompt(tiny, 5, 9, seed=1)[None]
    px = _pixels(tiny, 1, seed=1)
    kw = dict(
        input_ids=ids,
        pixel_values=px,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=[],
        prune=PruneConfig(keep=8),
    )
    chunks = list(zspa_jax.generate(vlm, stream=True, **kw))
    assert len(chunks) == NEW_TOKENS and all(c.shape == (1,) for c in chunks)
    np.testing.assert_array_equal(np.stack(chunks, axis=1), zspa_jax.generate(vlm, **kw).sequences)


@pytest.mark.slow
def test_generate_tokens_runs_inside_a_user_jit(vlm, tiny):
    ids = _prompt(tiny, 5, 9, seed=1)[None]
    px = _pixels(tiny, 1, seed=1)
    prune = PruneConfig(keep=8)

    @jax.jit
    def pipeline(ids, px, n):
        out = zspa_jax.generate_tokens(
            vlm,
            ids,
            px,
            jnp.ones_like(ids),
            max_new_tokens=n,
            max_new_tokens_bound=NEW_TOKENS,
            prune=prune,
            eos_token_id=[],
        )
        return out.tokens, out.kept_indices

    tokens, kept = pipeline(jnp.asarray(ids, jnp.int32), jnp.asarray(px), jnp.int32(NEW_TOKENS))
    ref = zspa_jax.generate(
        vlm, input_ids=ids, pixel_values=px, prune=prune, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    )
    np.testing.assert_array_equal(np.asarray(tokens)[:, :NEW_TOKENS], ref.sequences)
    np.testing.assert_array_equal(np.asarray(kept), ref.kept_indices)


def test_strings_and_images_use_the_saved_processor(vlm, tiny):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    question = "What is shown in this image?"
    ours = zspa_jax.generate(vlm, question, image, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    # The same text through the HF processor and transformers' generate.
    text = tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    batch = tiny.processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = tiny.hf.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
        ).numpy()[:, batch["input_ids"].shape[1] :]
    np.testing.assert_array_equal(ours.sequences, ref)
    assert ours.texts == [tiny.processor.tokenizer.decode(ref[0], skip_special_tokens=True).strip()]


# --- bad input: clear errors naming the problem -------------------------------------------------


def test_prompt_without_image_token_gets_the_image_first_without_a_template(vlm, tiny):
    image = Image.new("RGB", (28, 28))
    plain = zspa_jax.encode(vlm, "no placeholder here", image, chat_template=False)
    tagged = zspa_jax.encode(vlm, "<image>\nno placeholder here", image, chat_template=False)
    np.testing.assert_array_equal(plain["input_ids"], tagged["input_ids"])
    ids = plain["input_ids"][0]
    assert (
        ids[1] == tiny.image_token_index
        and (ids == tiny.image_token_index).sum() == tiny.tokens_per_image
    )


def test_image_token_count_mismatch_is_an_error(vlm, tiny):
    ids = _prompt(tiny, 2, 3, seed=0)[None]
    with pytest.raises(ValueError, match="image tokens"):
        zspa_jax.generate(
            vlm, input_ids=ids, pixel_values=_pixels(tiny, 2, seed=0), max_new_tokens=2
        )
    n = tiny.tokens_per_image
    ragged = np.stack([_prompt(tiny, 2, 3, seed=0), _prompt(tiny, 2, 3, seed=0)])
    ragged[0, -3:] = tiny.image_token_index  # 2 images' placeholders, split n + 3 / n - 3
    ragged[1, n : 3 + n] = 5
    assert (ragged == tiny.image_token_index).sum() == 2 * n
    with pytest.raises(
        ValueError, match=f"row 0: pruning needs each prompt's images as whole spans of {n}"
    ):
        zspa_jax.generate(
            vlm,
            input_ids=ragged,
            pixel_values=_pixels(tiny, 2, seed=0),
            prune=PruneConfig(keep=2),
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match=r"got 1 prompt\(s\) but 2 image\(s\)"):
        image = Image.new("RGB", (28, 28))
        zspa_jax.generate(vlm, ["<image> two images?"], [image, image], max_new_tokens=2)


def test_keep_larger_than_visual_tokens_is_an_error(vlm, tiny):
    ids = _prompt(tiny, 2, 3, seed=0)[None]
    with pytest.raises(ValueError, match=str(tiny.tokens_per_image)):
        zspa_jax.generate(
            vlm,
            input_ids=ids,
            pixel_values=_pixels(tiny, 1, seed=0),
            prune=PruneConfig(keep=tiny.tokens_per_image + 1),
        )


def test_over_long_prompt_is_an_error(vlm, tiny):
    limit = tiny.options["max_position_embeddings"]
    ids = _prompt(tiny, limit - tiny.tokens_per_image - 20, 10, seed=0)[None]
    with pytest.raises(ValueError, match=f"at most {limit}"):
        zspa_jax.generate(
            vlm, input_ids=ids, pixel_values=_pixels(tiny, 1, seed=0), max_new_tokens=32
        )


def test_bad_generation_arguments_are_errors(vlm, tiny):
    ids = _prompt(tiny, 2, 3, seed=0)[None]
    px = _pixels(tiny, 1, seed=0)
    for kwargs, pattern in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0, temperature=1.0), "top_k"),
        (dict(top_p=1.5, temperature=1.0), "top_p"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            zspa_jax.generate(
                vlm, input_ids=ids, pixel_values=px, **{"max_new_tokens": 2, **kwargs}
            )
    with pytest.raises(ValueError, match="exactly one of prompts"):
        zspa_jax.generate(vlm, max_new_tokens=2)


@pytest.mark.slow
def test_cli_generate_prints_the_answer_and_a_summary(vlm, tiny, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    image_path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        image_path
    )
    question = "What is shown in this image?"
    expected = zspa_jax.generate(
        vlm, question, Image.open(image_path), prune=PruneConfig(keep=4), max_new_tokens=6
    ).texts[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zspa_jax",
            "generate",
            "--model",
            str(vlm.path),
            "--image",
            str(image_path),
            "--prompt",
            question,
            "--keep",
            "4",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert f"visual tokens 4/{tiny.tokens_per_image}" in proc.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "zspa_jax",
            "generate",
            "--model",
            str(vlm.path),
            "--image",
            str(image_path),
            "--prompt",
            question,
            "--keep",
            str(tiny.tokens_per_image + 1),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_text_only_prompt_ignores_pruning_and_keeps_its_cache(vlm, tiny):
    ids = np.random.default_rng(3).integers(10, 290, size=(1, 60))
    plain = zspa_jax.generate(vlm, input_ids=ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    pruned = zspa_jax.generate(
        vlm, input_ids=ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], prune=PruneConfig(keep=2)
    )
    np.testing.assert_array_equal(plain.sequences, pruned.sequences)
    assert pruned.kept_indices is None
    assert pruned.stats["cache_length"] >= 64 + NEW_TOKENS
    with torch.no_grad():
        ref = tiny.hf.generate(
            input_ids=torch.as_tensor(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
        ).numpy()[:, ids.shape[1] :]
    np.testing.assert_array_equal(plain.sequences, ref)


@pytest.mark.parametrize("budget, images", [("row", 1), ("image", 2)])
def test_pruned_generate_sizes_its_cache_from_the_pruned_prompt(vlm, tiny, budget, images):
    """The KV cache holds the pruned prompt (padded to its own bucket) plus the new tokens,
    rounded up to the cache bucket, not the unpruned prompt: here the pruned prompt plus the
    new tokens fill whole buckets, so one slot more (the N - K dropped tokens) would not fit."""
    n, keep = tiny.tokens_per_image, 2
    ids = _prompt(tiny, 30, 23, seed=30)  # 70 real tokens with one image
    for _ in range(images - 1):
        ids = np.concatenate([ids[:-3], np.full(n, tiny.image_token_index), ids[-3:]])
    bucket, cache_bucket = generation.prompt_bucket, generation.CACHE_BUCKET
    dropped = images * (n - keep)
    pruned_length = bucket(len(ids) - dropped)  # its own bucket
    new = cache_bucket
    kw = dict(
        input_ids=ids[None],
        pixel_values=_pixels(tiny, images, seed=30),
        max_new_tokens=new,
        eos_token_id=[],
    )
    full = zspa_jax.generate(vlm, **kw)
    pruned = zspa_jax.generate(vlm, **kw, prune=PruneConfig(keep=keep, budget=budget))
    assert (
        full.stats["cache_length"]
        == round_up(bucket(len(ids)) + new, cache_bucket)
        == 3 * cache_bucket
    )
    assert pruned.stats["cache_length"] == pruned_length + new == 2 * cache_bucket
    assert pruned.stats["visual_tokens_kept_per_row"] == images * keep
    assert pruned.stats["prompt_tokens_per_row_pruned"] == [len(ids) - dropped]
    assert pruned.stats["kv_cache_bytes"] * 3 == full.stats["kv_cache_bytes"] * 2


@pytest.mark.slow
def test_a_pruned_prompt_is_padded_to_its_own_bucket_and_costs_less_at_every_keep(vlm, tiny):
    """generate pads a pruned prompt so that its pruned length L - N + K is its own length's
    prompt bucket (not the unpruned prompt's), and XLA counts fewer prefill flops than
    unpruned at the smallest and the largest keep: the prompt has one real token more than
    a bucket (64), so dropping any visual token saves a whole step (padded like the unpruned
    prompt, the pruned one kept the unpruned length and cost more: the selection on top)."""
    from zspa_jax import decode
    from zspa_jax.batch import device_arrays, prepare_arrays
    from zspa_jax.sampling import Sampling

    n, bucket = tiny.tokens_per_image, generation.prompt_bucket
    ids = _prompt(tiny, 30, 18, seed=31)[None]  # 1 + 30 + N + 18 = 65 real tokens
    px = _pixels(tiny, 1, seed=31)
    flops, lengths = {}, {}
    for keep in (None, 1, n - 1):
        prune = None if keep is None else PruneConfig(keep=keep)
        host = prepare_arrays(
            vlm, ids, px, None, {}, prune, extra_length=4, bucket=True, prompt_bucket=bucket
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
        d_ids, d_mask, d_pixels, aux = device_arrays(host, vlm.mesh)
        args = (vlm.state, d_ids, d_pixels, d_mask, aux, jax.random.key(0))
        lengths[keep] = host.input_ids.shape[1] - (0 if keep is None else n - keep)
        assert lengths[keep] == bucket(ids.shape[1] - (0 if keep is None else n - keep)), keep
        cost = decode.prefill_program.lower(vlm.graphdef, *args, st=st).compile().cost_analysis()
        flops[keep] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    for keep in (1, n - 1):
        assert 0 < flops[keep] < flops[None], (keep, flops)
    assert (
        ids.shape[1] == 65
        and bucket(64) == 64
        and lengths[None] == bucket(65) > 64
        and lengths[n - 1] == 64
    )


# ----------------------------------------------------------------------------- Qwen2.5-VL


@pytest.mark.slow
@pytest.mark.parametrize(
    "image_px", [64, 16]
)  # 8 x 8 = 64 merged tokens (one span bucket); 2 x 2 = 4 (60 masked slots)
def test_qwen_pruned_prompt_is_padded_to_its_own_bucket_and_costs_less_at_every_keep(image_px):
    """Qwen2.5-VL, as LLaVA above: generate pads a pruned prompt so that its pruned length
    L - N + K is its own length's prompt bucket (N: the row's placeholder slots, the span
    padded to its bucket), and XLA counts fewer prefill flops than unpruned at the smallest
    and the largest keep: the prompt has one real token more than a bucket, so dropping any
    visual token saves a whole step. For the small image the span's masked slots would
    otherwise push the prompt into the next bucket."""
    from tests.support.tiny_qwen2_5_vl import converted as qwen_converted
    from tests.support.tiny_qwen2_5_vl import random_image, tiny_model
    from zspa_jax import decode
    from zspa_jax.batch import device_arrays, prepare_arrays
    from zspa_jax.sampling import Sampling

    vlm = zspa_jax.load(qwen_converted(tiny_model()))
    bucket = generation.prompt_bucket
    image = random_image(image_px, image_px, seed=32)
    encode = lambda words: vlm.processor.encode([" ".join(["cat"] * words)], [image])  # noqa: E731
    shortest = encode(1)["input_ids"].shape[1]
    target = bucket(shortest + 1) + 1  # one real token more than a bucket
    enc = encode(1 + target - shortest)
    ids, grid = enc["input_ids"], enc["image_grid_thw"]
    n = int((ids == vlm.config.image_token_id).sum())
    assert ids.shape[1] == target and n == (image_px // 8) ** 2
    flops, lengths = {}, {}
    for keep in (None, 1, n - 1):
        prune = None if keep is None else PruneConfig(keep=keep)
        host = prepare_arrays(
            vlm,
            ids,
            enc["pixel_values"],
            enc["attention_mask"],
            {"image_grid_thw": grid},
            prune,
            extra_length=4,
            bucket=True,
            prompt_bucket=bucket,
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
        d_ids, d_mask, d_pixels, aux = device_arrays(host, vlm.mesh)
        args = (vlm.state, d_ids, d_pixels, d_mask, aux, jax.random.key(0))
        lengths[keep] = host.input_ids.shape[1] - (0 if keep is None else host.num_visual - keep)
        real = target - (0 if keep is None else n - keep)
        assert lengths[keep] == bucket(real), (keep, lengths)  # its own bucket
        cost = decode.prefill_program.lower(vlm.graphdef, *args, st=st).compile().cost_analysis()
        flops[keep] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    for keep in (1, n - 1):
        assert 0 < flops[keep] < flops[None], (keep, flops)
    assert lengths[None] == bucket(target) > target - 1 and lengths[n - 1] == target - 1
    res = zspa_jax.generate(
        vlm,
        input_ids=ids,
        pixel_values=enc["pixel_values"],
        image_grid_thw=grid,
        attention_mask=enc["attention_mask"],
        prune=PruneConfig(keep=1),
        max_new_tokens=2,
    )
    assert res.stats["prompt_tokens_per_row_pruned"] == [target - n + 1]
