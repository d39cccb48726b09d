"""The demo task, its training loop, and the shipped demo model (vs transformers).

(a) the scene generator is deterministic, splits are disjoint, answers are in the
    vocabulary, every question type occurs, and the fast encoder equals the HF processor;
(b) the symbolic patch tokens describe the scene; each training stage's loss falls on a
    tiny config, and the alignment stage leaves the LLM untouched;
(c) the shipped converted checkpoint, re-exported to HF format, loads in transformers and
    gives the same next-token logits and greedy answers as `zspa_jax.forward` on 50 test
    questions; `zspa_jax.forward` reproduces the test accuracy the training run recorded.
"""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pytest

from zspa_jax.demo import scenes
from zspa_jax.demo.tokenizer import IMAGE_ID, FastEncoder, build_processor, build_tokenizer

ASSET = pathlib.Path(__file__).resolve().parents[1] / "zspa_jax" / "assets" / "demo_model"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --------------------------------------------------------------------------- (a) data


def _digest(img) -> str:
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


def test_scenes_are_pure_functions_of_split_and_index():
    for split in ("train", "test"):
        for i in (0, 7, 12345):
            a, b = scenes.make_scene(split, i), scenes.make_scene(split, i)
            assert a == b
            assert _digest(a.render()) == _digest(b.render())
            assert scenes.example(split, i) == scenes.example(split, i)
    assert scenes.make_scene("train", 3) != scenes.make_scene("train", 4)
    with pytest.raises(ValueError, match="split"):
        scenes.make_scene("dev", 0)


def test_splits_are_disjoint():
    digests = {
        s: {_digest(scenes.make_scene(s, i).render()) for i in range(150)} for s in scenes.SPLITS
    }
    assert all(len(d) == 150 for d in digests.values())  # no duplicates inside a split either
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_questions_answers_and_captions_are_in_vocabulary(tokenizer):
    vocab = tokenizer.get_vocab()
    exs = scenes.examples("test", 140)
    assert {e.qa.qtype for e in exs} == set(scenes.QUESTION_TYPES)
    counts = {t: sum(e.qa.qtype == t for e in exs) for t in scenes.QUESTION_TYPES}
    assert min(counts.values()) >= 10, counts
    possible = scenes.answer_words()
    for e in exs:
        assert e.qa.answer in vocab
        assert e.qa.answer in possible[e.qa.qtype]
        for text in (e.qa.question, e.scene.caption(), scenes.SYSTEM):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.unk_token_id not in ids, text
            assert len(ids) == len(text.split())  # one word, one token
    # Answers are one word: a single token each.
    for words in possible.values():
        for w in words:
            assert len(tokenizer.encode(w, add_special_tokens=False)) == 1


def test_answers_are_consistent_with_the_scene():
    for e in scenes.examples("val", 70):
        s, qa = e.scene, e.qa
        assert 1 <= len(s.objects) <= scenes.MAX_OBJECTS
        assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects)
        if qa.qtype == "count_all":
            assert qa.answer == str(len(s.objects))
        if qa.qtype == "background":
            assert qa.answer == s.background
        if qa.target is not None:
            obj = s.objects[qa.target]
            assert obj.colour in qa.question or obj.shape in qa.question
            if qa.qtype == "colour":
                assert qa.answer == obj.colour and s.count(obj.shape) == 1


def test_fast_encoder_matches_the_hf_processor(tokenizer):
    processor = build_processor(tokenizer)
    enc = FastEncoder(tokenizer)
    for e in scenes.examples("test", 3):
        out = processor(text=e.prompt, images=e.image(), return_tensors="np")
        ids = out["input_ids"][0]
        assert (ids == IMAGE_ID).sum() == scenes.GRID**2 == 576
        assert list(ids) == enc.prompt_ids(e.qa.question)
        # the question comes after the image span (prompt_scope="question" sees it)
        after = ids[np.nonzero(ids == IMAGE_ID)[0][-1] + 1 :]
        assert (
            tokenizer.decode(after).split()[: len(e.qa.question.split())] == e.qa.question.split()
        )
        np.testing.assert_allclose(out["pixel_values"][0], enc.pixels(e.image()), atol=1e-6)
    # user-typed text normalises to the same tokens
    assert (
        tokenizer("What colour is the circle?").input_ids
        == tokenizer("what colour is the circle ?").input_ids
    )


# --------------------------------------------------------------------------- (b) training


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.slow
def test_a_few_training_steps_reduce_the_loss(tokenizer, stage):
    """Each stage's objective falls over a few steps on one fixed batch; stage 1 leaves the LLM untouched."""
    import jax
    from flax import nnx

    from models.llava import LlavaForConditionalGeneration
    from zspa_jax.demo.config import QUICK, TrainConfig
    from zspa_jax.demo.data import SLOTS, Batches, prefix_ids
    from zspa_jax.demo.model import init_model, make_optimizer, make_train_step, model_config

    tc = TrainConfig(**{**QUICK, "batch": 4, "symbolic_batch": 4, "qa_per_image": 3})
    enc = FastEncoder(tokenizer)
    model = LlavaForConditionalGeneration(model_config(tc, len(tokenizer)), rngs=nnx.Rngs(0))
    init_model(model, 0)
    graphdef, state = nnx.split(model)
    optimizer = make_optimizer(tc, 8, 3e-3, state, frozen="language_model" if stage == 1 else None)
    opt_state = optimizer.init(state)
    step = make_train_step(graphdef, optimizer, stage, tc.align_weight)
    prefix = jax.numpy.asarray(prefix_ids(enc))
    batch = Batches(tc, enc).batch(stage, 0)
    if stage == 0:
        assert batch["sym_ids"].shape == (4, tc.symbolic_tokens, SLOTS) and "pixels" not in batch
    else:
        assert batch["pixels"].shape == (4, 3, 96, 96) and batch["sym_ids"].shape == (4, 576, SLOTS)
    if stage != 1:  # a caption segment plus the stage's own number of questions
        expected = 1 + (tc.symbolic_qa_per_image if stage == 0 else tc.qa_per_image)
        assert {len(set(row[row > 0])) for row in batch["seg"]} == {expected}
    llm_before = jax.tree.map(np.asarray, nnx.state(model.language_model))
    key = "align" if stage == 1 else "lm"
    losses = []
    for _ in range(8):
        state, opt_state, m = step(state, opt_state, prefix, batch)
        losses.append(float(m[key]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    if stage == 1:
        llm_after = nnx.state(nnx.merge(graphdef, state).language_model)
        jax.tree.map(np.testing.assert_array_equal, llm_before, jax.tree.map(np.asarray, llm_after))


def test_symbolic_tokens_describe_the_scene(tokenizer):
    """Stage 0 / alignment targets: background where nothing is drawn, the object's words
    where it covers the patch, one centre marker per object."""
    from zspa_jax.demo.data import SLOTS, patch_coverage, patch_words

    vocab = FastEncoder(tokenizer).vocab
    scene = next(
        s for s in (scenes.make_scene("train", i) for i in range(50)) if len(s.objects) >= 3
    )
    ids, w = patch_words(scene, vocab)
    cov = patch_coverage(scene)
    assert ids.shape == w.shape == (576, SLOTS)
    np.testing.assert_allclose(w[cov.sum(1) == 0, 0], 1.0)
    np.testing.assert_allclose(w.sum(1)[cov.sum(1) == 0], 1.0)
    assert w[:, 7].sum() == len(scene.objects)
    for k, obj in enumerate(scene.objects):
        mostly = np.flatnonzero(cov[:, k] > 0.5)
        assert len(mostly) >= 4
        words = {vocab[obj.colour], vocab[obj.shape], vocab[obj.position]}
        for i in mostly:
            assert set(ids[i, 1:4]) == words
            np.testing.assert_allclose(w[i, 1:4], cov[i, k])
            np.testing.assert_allclose(
                w[i, 0], max(0.0, 1.0 - np.sort(cov[i])[::-1][:2].sum()), atol=1e-6
            )
        centre = int(obj.cy // scenes.PATCH_SIZE) * scenes.GRID + int(obj.cx // scenes.PATCH_SIZE)
        assert w[centre, 7] == 1.0 and cov[centre, k] > 0


@pytest.mark.slow
def test_text_area_decoder_equals_the_full_forward(tokenizer):
    """The training shortcut (last layer on text positions only) is exact."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.llava import LlavaForConditionalGeneration
    from zspa_jax.demo.config import QUICK, TrainConfig
    from zspa_jax.demo.data import prefix_ids
    from zspa_jax.demo.model import model_config, model_outputs

    tc = TrainConfig(**{**QUICK, "text_layers": 2})
    enc = FastEncoder(tokenizer)
    model = LlavaForConditionalGeneration(model_config(tc, len(tokenizer)), rngs=nnx.Rngs(1))
    e = scenes.example("val", 5)
    ids = enc.prompt_ids(e.qa.question)
    px = enc.pixels(e.image())[None]
    prefix = prefix_ids(enc)
    with jax.default_matmul_precision("highest"):
        full = model(jnp.asarray([ids]), jnp.asarray(px))
        q = jnp.asarray([ids[len(prefix) :]], jnp.int32)
        hidden, _ = model_outputs(
            model,
            jnp.asarray(prefix),
            jnp.asarray(px),
            q,
            jnp.ones_like(q),
            jnp.arange(q.shape[1])[None],
        )
        mine = model.language_model.logits(hidden)
    np.testing.assert_allclose(np.asarray(mine[0]), np.asarray(full[0, len(prefix) :]), atol=1e-5)


def test_patch_readout_scores_tokens_by_the_words_they_carry(tokenizer):
    """Tokens equal to E[colour] + E[shape] + E[cell] of the object under them read out
    perfectly (orthonormal table); giving every object the next shape's word is caught."""
    from zspa_jax.demo.data import patch_words
    from zspa_jax.demo.evaluate import patch_readout_accuracy

    vocab = FastEncoder(tokenizer).vocab
    table = np.linalg.qr(np.random.default_rng(0).normal(size=(128, len(vocab))))[
        0
    ].T  # [V, 128], orthonormal rows
    scene_list = [
        sc for sc in (scenes.make_scene("val", i) for i in range(40)) if len(sc.objects) >= 2
    ][:5]
    words = [patch_words(sc, vocab) for sc in scene_list]
    right = np.stack([table[ids[:, 1:4]].sum(1) for ids, _ in words])
    assert patch_readout_accuracy(right, table, vocab, words) == {
        "colour": 1.0,
        "shape": 1.0,
        "cell": 1.0,
    }
    next_shape = {
        vocab[s]: vocab[scenes.SHAPES[(k + 1) % len(scenes.SHAPES)]]
        for k, s in enumerate(scenes.SHAPES)
    }
    wrong = []
    for ids, _ in words:
        ids = ids.copy()
        ids[:, 2] = [next_shape.get(int(i), int(i)) for i in ids[:, 2]]
        wrong.append(table[ids[:, 1:4]].sum(1))
    assert patch_readout_accuracy(np.stack(wrong), table, vocab, words) == {
        "colour": 1.0,
        "shape": 0.0,
        "cell": 1.0,
    }


# --------------------------------------------------------------------------- (c) shipped model


@pytest.fixture(scope="module")
def shipped():
    if not (ASSET / "zspa_config.json").exists():
        pytest.fail(f"the demo model is missing at {ASSET}; run `python -m zspa_jax.demo.train`")
    import zspa_jax

    return zspa_jax.load(ASSET)


def test_shipped_model_matches_transformers(shipped, tmp_path):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import zspa_jax
    from zspa_jax.demo.export import export_hf

    hf_dir = export_hf(shipped, shipped.config, None, shipped.processor, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(hf_dir)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()

    exs = scenes.examples("test", 50)
    inputs = processor(
        text=[e.prompt for e in exs],
        images=[e.image() for e in exs],
        padding=True,
        return_tensors="np",
    )
    ids, mask, px = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    assert processor.tokenizer.padding_side == "left"
    # Left padding: the answer position is the last column for every row.
    with torch.no_grad():
        position_ids = torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None))
        hf_logits = (
            model(
                input_ids=torch.from_numpy(ids),
                pixel_values=torch.from_numpy(px),
                attention_mask=torch.from_numpy(mask),
                position_ids=position_ids,
            )
            .logits[:, -1]
            .numpy()
        )
    ours = zspa_jax.forward(shipped, ids, px, mask)[:, -1]
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=0)
    vocab = {i: w for w, i in processor.tokenizer.get_vocab().items()}
    hf_answers = [vocab[int(t)] for t in hf_logits.argmax(-1)]
    our_answers = [vocab[int(t)] for t in ours.argmax(-1)]
    assert our_answers == hf_answers


@pytest.mark.slow
def test_symbolic_answers_are_the_decoder_fed_symbolic_patches(shipped):
    """`answer_batch(symbolic_tokens=576)`, the perfect-tower ceiling the training log
    reports, answers what the full decoder answers when every image slot of the prompt
    holds its patch's symbolic token; the shipped LLM still reads such tokens."""
    import jax.numpy as jnp

    from zspa_jax.demo.data import patch_words
    from zspa_jax.demo.evaluate import answer_batch
    from zspa_jax.demo.model import symbolic_tokens

    enc = FastEncoder(shipped.processor.tokenizer)
    exs = scenes.examples("val", 14)
    mine = answer_batch(shipped.graphdef, shipped.state, enc, exs, batch=14, symbolic_tokens=576)
    lm = shipped.model.language_model
    table = lm.model.embed_tokens.embedding[...]
    words = {i: w for w, i in enc.vocab.items()}
    n_head = len(enc.head)
    expected = []
    for e in exs:
        ids = jnp.asarray([enc.prompt_ids(e.qa.question)])
        sym = symbolic_tokens(table, *map(jnp.asarray, patch_words(e.scene, enc.vocab)))
        embeds = shipped.model.embed_tokens(ids).at[0, n_head : n_head + 576].set(sym)
        length = ids.shape[1]
        hidden, _ = lm.model(
            embeds, jnp.arange(length)[None], jnp.tril(jnp.ones((length, length), bool))[None]
        )
        expected.append(words[int(jnp.argmax(lm.logits(hidden[0, -1])))])
    assert mine == expected
    assert np.mean([a == e.qa.answer for a, e in zip(mine, exs)]) >= 0.5


def test_shipped_model_is_small_and_complete():
    files = [p for p in ASSET.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"zspa_config.json", "tokenizer.json", "processor_config.json", "config.json"} <= names
    assert not any(
        p.suffix in (".safetensors", ".bin", ".pt") for p in files
    )  # no torch weights shipped
    assert sum(p.stat().st_size for p in files) < 8 * 2**20


@pytest.mark.slow
def test_shipped_model_reproduces_its_recorded_test_accuracy(shipped):
    """`zspa_jax.forward` on the shipped checkpoint answers the test questions exactly as
    the training run's own evaluation did (accuracy per type recorded in demo_info.json),
    and clearly beats the best answer prior (the most frequent answer of each type)."""
    import json
    from collections import Counter

    import zspa_jax

    recorded = json.loads((ASSET / "demo_info.json").read_text())["history"]["test"]
    exs = scenes.examples("test", recorded["n"])
    enc = FastEncoder(shipped.processor.tokenizer)
    vocab = {i: w for w, i in enc.vocab.items()}
    answers = []
    for s in range(0, len(exs), 100):
        chunk = exs[s : s + 100]
        prompts = [enc.prompt_ids(e.qa.question) for e in chunk]
        width = max(map(len, prompts))
        ids = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width), np.int32)
        for r, p in enumerate(prompts):  # left padding: the answer position is the last column
            ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
        px = np.stack([enc.pixels(e.image()) for e in chunk])
        logits = np.asarray(zspa_jax.forward(shipped, ids, px, mask)[:, -1])
        answers += [vocab[int(t)] for t in logits.argmax(-1)]
    correct = np.array([a == e.qa.answer for a, e in zip(answers, exs)])
    types = np.array([e.qa.qtype for e in exs])
    per_type = {
        t: float(correct[types == t].mean()) for t in scenes.QUESTION_TYPES if (types == t).any()
    }
    assert per_type == pytest.approx(recorded["per_type"], abs=1e-12)
    assert correct.mean() == pytest.approx(recorded["overall"], abs=1e-12)
    prior = sum(
        Counter(e.qa.answer for e in exs if e.qa.qtype == t).most_common(1)[0][1] for t in per_type
    ) / len(exs)
    assert correct.mean() > prior + 0.15, (correct.mean(), prior)
