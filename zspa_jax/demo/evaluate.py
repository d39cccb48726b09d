"""Evaluation of the demo model: greedy one-word answers, accuracy per question type, and
how well the visual tokens name what they show (per-patch readout)."""

from __future__ import annotations

from functools import cache, partial

import numpy as np

from zspa_jax.demo import scenes
from zspa_jax.demo.data import QA_SLOT, patch_words, prefix_ids, symbolic_subset
from zspa_jax.demo.model import model_outputs, symbolic_outputs
from zspa_jax.demo.tokenizer import PAD_ID, FastEncoder


def answer_batch(
    graphdef,
    state,
    enc: FastEncoder,
    exs: list,
    batch: int = 35,
    symbolic_tokens: int | None = None,
) -> list[str]:
    """Greedy one-word answers (argmax at the answer position), right-padded batches.

    With `symbolic_tokens`, the LLM answers from each scene's perfect symbolic patch tokens
    (stage 0's input, that many patches) instead of the tower's: the accuracy a tower that
    met its alignment targets exactly would give.
    """
    id_to_word = {i: w for w, i in enc.vocab.items()}
    prefix = prefix_ids(enc)
    out: list[str] = []
    for s in range(0, len(exs), batch):
        chunk = exs[s : s + batch]
        ids = np.full((batch, QA_SLOT), PAD_ID, np.int32)
        last = np.zeros(batch, np.int32)
        for r, e in enumerate(chunk):
            q = enc.question_ids(e.qa.question)
            ids[r, : len(q)] = q
            last[r] = len(q) - 1
        if symbolic_tokens is None:
            inputs = np.zeros((batch, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), np.float32)
            for r, e in enumerate(chunk):
                inputs[r] = enc.pixels(e.image())
        else:  # a fixed background sample per scene (its own seed stream, 98)
            rows = [
                symbolic_subset(
                    *patch_words(e.scene, enc.vocab),
                    symbolic_tokens,
                    np.random.default_rng([scenes.BASE_SEED, 98, e.scene.index]),
                    len(enc.head),
                )
                for e in chunk
            ]
            rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch - len(chunk))
            inputs = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        pred = np.asarray(
            _answer_fn()(graphdef, symbolic_tokens is not None, state, prefix, inputs, ids, last)
        )
        out.extend(id_to_word[int(t)] for t in pred[: len(chunk)])
    return out


@cache
def _answer_fn():
    """jit(fn)(graphdef, symbolic, state, prefix, inputs, ids, last): the argmax token at
    `last` [B] of each question; `inputs` are pixels or, if `symbolic`, symbolic rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @partial(jax.jit, static_argnums=(0, 1))
    def fn(graphdef, symbolic: bool, state, prefix, inputs, ids, last):
        model = nnx.merge(graphdef, state)
        seg = jnp.ones(ids.shape, jnp.int32)
        offset = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        if symbolic:
            hidden = symbolic_outputs(
                model, prefix, {**inputs, "ids": ids, "seg": seg, "offset": offset}
            )
        else:
            hidden, _ = model_outputs(model, prefix, inputs, ids, seg, offset)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return jnp.argmax(model.language_model.logits(h), axis=-1)

    return fn


READOUT_GROUPS = {"colour": tuple(scenes.COLOURS), "shape": scenes.SHAPES, "cell": scenes.POSITIONS}


def patch_readout_accuracy(
    visual: np.ndarray, table: np.ndarray, vocab: dict, words: list
) -> dict[str, float]:
    """How well visual tokens [S, 576, D] name what they show, read through the LLM's
    embedding table [V, D]. `words` holds each scene's `patch_words` (ids, weights). On
    patches mostly covered by one object: how often the word of each group (colour, shape,
    cell) with the largest dot product is that object's."""
    group_ids = {g: np.asarray([vocab[x] for x in group]) for g, group in READOUT_GROUPS.items()}
    hits: dict[str, list[np.ndarray]] = {g: [] for g in READOUT_GROUPS}
    for (ids, w), v in zip(words, visual):
        main = w[:, 1] > 0.5
        for slot, (group, word_ids) in enumerate(group_ids.items()):
            hits[group].append(
                word_ids[(v[main] @ table[word_ids].T).argmax(1)] == ids[main, 1 + slot]
            )
    return {g: float(np.concatenate(h).mean()) for g, h in hits.items()}


def accuracy_report(exs: list, answers: list[str]) -> dict:
    per: dict[str, list[int]] = {t: [] for t in scenes.QUESTION_TYPES}
    for e, a in zip(exs, answers):
        per[e.qa.qtype].append(int(a == e.qa.answer))
    report = {
        "overall": float(np.mean([int(a == e.qa.answer) for e, a in zip(exs, answers)])),
        "n": len(exs),
    }
    report["per_type"] = {t: float(np.mean(v)) for t, v in per.items() if v}
    return report
