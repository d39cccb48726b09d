"""Demo training data: each scene's symbolic patch tokens and the deterministic batches the stages feed on.

Also the shared prompt prefix every step is fed and a background-thread prefetcher.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from zspa_jax.demo import scenes
from zspa_jax.demo.config import TrainConfig
from zspa_jax.demo.tokenizer import EOS_ID, PAD_ID, FastEncoder

QA_SLOT = 11  # tokens a question segment can take: "what shape is the red object ? assistant :" + answer + </s>
CAPTION_SLOT = 48  # "describe the image . assistant :" + caption (<= 35 words) + </s>
SLOTS = 8  # words mixed into one symbolic patch token: background, 2 x (colour, shape, cell), centre marker


def patch_coverage(scene: scenes.Scene) -> np.ndarray:
    """f32 [576, n_objects]: fraction of each patch's pixels covered by each object."""
    from PIL import Image, ImageDraw

    size, p, g = scenes.IMAGE_SIZE, scenes.PATCH_SIZE, scenes.GRID
    ids = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ids)
    for k, obj in enumerate(scene.objects):
        if obj.shape == "circle":
            r = obj.radius
            draw.ellipse([obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r], fill=k + 1)
        else:
            draw.polygon(scenes._polygon(obj), fill=k + 1)
    a = np.asarray(ids).reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
    return np.stack([(a == k + 1).mean(axis=1) for k in range(len(scene.objects))], axis=1).astype(
        np.float32
    )


def patch_words(scene: scenes.Scene, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The symbolic token of every patch as a mixture of word embeddings.

    Returns (ids int32 [576, SLOTS], weights f32 [576, SLOTS]); the token is
    sum_k weights[k] * E[ids[k]]. Slot 0: the background colour, weight 1 - coverage.
    Slots 1-6: colour, shape and grid cell of the (at most two) objects covering the
    patch, each weighted by the fraction of the patch that object covers. Slot 7: "a",
    weight 1 on the patch holding an object's centre (one marker per object instance).
    """
    n = scenes.GRID**2
    ids = np.zeros((n, SLOTS), np.int32)
    w = np.zeros((n, SLOTS), np.float32)
    ids[:, 0] = vocab[scene.background]
    ids[:, 7] = vocab["a"]
    if not scene.objects:
        w[:, 0] = 1.0
        return ids, w
    cov = patch_coverage(scene)
    attributes = np.asarray(
        [[vocab[o.colour], vocab[o.shape], vocab[o.position]] for o in scene.objects], np.int32
    )
    order = np.argsort(-cov, axis=1)[:, :2]
    rows = np.arange(n)
    for slot in range(order.shape[1]):
        k = order[:, slot]
        ids[:, 1 + 3 * slot : 4 + 3 * slot] = attributes[k]
        w[:, 1 + 3 * slot : 4 + 3 * slot] = cov[rows, k][:, None]
    w[:, 0] = np.clip(1.0 - w[:, 1] - w[:, 4], 0.0, 1.0)
    g, p = scenes.GRID, scenes.PATCH_SIZE
    w[[int(o.cy // p) * g + int(o.cx // p) for o in scene.objects], 7] = 1.0
    return ids, w


def questions_per_image(tc: TrainConfig, stage: int) -> int:
    """Question segments per scene in `stage` (0 or 2)."""
    return tc.symbolic_qa_per_image if stage == 0 else tc.qa_per_image


def symbolic_subset(
    sym_ids, sym_w, width: int, rng: np.random.Generator, n_head: int
) -> dict[str, np.ndarray]:
    """Stage 0's view of a scene: all patches an object touches, then random background
    patches, `width` in all, in raster order. Returns sym_ids / sym_w [width, SLOTS] and
    sym_pos [width], their RoPE positions after the `n_head` tokens before the image."""
    touched = np.flatnonzero(sym_w[:, 0] < 1.0)
    if len(touched) > width:
        touched = touched[np.argsort(sym_w[touched, 0], kind="stable")[:width]]
    rest = np.setdiff1d(np.arange(len(sym_w)), touched)
    pick = np.sort(np.concatenate([touched, rng.choice(rest, width - len(touched), replace=False)]))
    return dict(sym_ids=sym_ids[pick], sym_w=sym_w[pick], sym_pos=(n_head + pick).astype(np.int32))


def text_area_length(tc: TrainConfig, stage: int) -> int:
    """Tokens after the shared prefix in stages 0 and 2: caption segment + QA segments."""
    return CAPTION_SLOT * tc.captions + QA_SLOT * questions_per_image(tc, stage)


class Batches:
    """Deterministic batches: batch `step` of `stage` is a pure function of (config, stage, step).

    Every row has the symbolic patch tokens (`sym_ids`, `sym_w`, see `patch_words`).
    Stages 0 and 2 add the text area after the shared prefix (ids, targets, loss weights,
    segment ids with 0 = padding, within-segment offsets); stages 1 and 2 add the pixels
    [3, 96, 96]. Stage 0 keeps a subset of patches, with their positions (`sym_pos`).
    """

    def __init__(self, tc: TrainConfig, enc: FastEncoder):
        self.tc = tc
        self.enc = enc
        self.vocab = enc.vocab

    def scene_index(self, stage: int, step: int, row: int) -> int:
        if stage == 0:  # a range of train scenes the image stages never reach
            return 50_000_000 + step * self.tc.symbolic_batch + row
        base = 0 if stage == 1 else self.tc.stage1_steps * self.tc.batch
        return base + step * self.tc.batch + row

    def segment(
        self, question: str, response: list[int]
    ) -> tuple[list[int], list[int], list[float]]:
        q = self.enc.question_ids(question)
        ids = q + response
        targets = ids[1:] + [PAD_ID]
        weights = [0.0] * len(ids)
        for i in range(len(q) - 1, len(ids) - 1):  # positions whose next token is the response
            weights[i] = 1.0
        return ids, targets, weights

    def text_area(
        self, scene: scenes.Scene, rng: np.random.Generator, stage: int
    ) -> dict[str, np.ndarray]:
        segs = []
        if self.tc.captions:
            segs.append(
                self.segment(scenes.CAPTION_QUESTION, self.enc.words(scene.caption()) + [EOS_ID])
            )
        for qa in scenes.training_qas(scene, questions_per_image(self.tc, stage), rng):
            segs.append(self.segment(qa.question, [self.vocab[qa.answer], EOS_ID]))
        ids, targets, weights, seg, offset = _pack(segs, text_area_length(self.tc, stage))
        if self.tc.captions:  # captions stay in the mix, at a lower weight
            weights[seg == 1] *= 0.3
        return dict(ids=ids, targets=targets, weights=weights, seg=seg, offset=offset)

    def row(self, stage: int, index: int) -> dict[str, np.ndarray]:
        scene = scenes.make_scene("train", index)
        rng = np.random.default_rng([scenes.BASE_SEED, 99, index, self.tc.seed])
        out = {} if stage == 1 else self.text_area(scene, rng, stage)
        sym_ids, sym_w = patch_words(scene, self.vocab)
        if stage == 0:
            out.update(
                symbolic_subset(sym_ids, sym_w, self.tc.symbolic_tokens, rng, len(self.enc.head))
            )
        else:
            out.update(pixels=self.enc.pixels(scene.render()), sym_ids=sym_ids, sym_w=sym_w)
        return out

    def batch(self, stage: int, step: int) -> dict[str, np.ndarray]:
        size = self.tc.symbolic_batch if stage == 0 else self.tc.batch
        rows = [self.row(stage, self.scene_index(stage, step, r)) for r in range(size)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _pack(segs, length: int):
    """Concatenate (ids, targets, weights) segments into fixed-length arrays + segment ids/offsets."""
    ids = np.full(length, PAD_ID, np.int32)
    targets = np.full(length, PAD_ID, np.int32)
    weights = np.zeros(length, np.float32)
    seg = np.zeros(length, np.int32)
    offset = np.zeros(length, np.int32)
    at = 0
    for k, (i, t, w) in enumerate(segs):
        n = len(i)
        if at + n > length:
            raise AssertionError(f"text area overflow ({at + n} > {length})")
        ids[at : at + n], targets[at : at + n], weights[at : at + n] = i, t, w
        seg[at : at + n] = k + 1
        offset[at : at + n] = np.arange(n)
        at += n
    return ids, targets, weights, seg, offset


def prefetch(fn, steps: range, depth: int = 3):
    """Yield fn(step) for each step, produced by a background thread (order preserved)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for s in steps:
                if stop.is_set():
                    return
                q.put(fn(s))
        except BaseException as e:  # surface data errors in the main thread
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        for _ in steps:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def prefix_ids(enc: FastEncoder) -> np.ndarray:
    return np.asarray(enc.prefix_ids(), np.int32)
