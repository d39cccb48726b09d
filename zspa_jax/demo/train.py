"""Train the small demo LLaVA on the procedural shapes task, export it, ship it.

    python -m zspa_jax.demo.train [--out DIR] [--quick] [--seed N] ...

Model: our `models.llava` LLaVA with a narrow CLIP-style ViT (96 px images, 4 px patches
-> 24 x 24 = 576 visual tokens, like LLaVA-1.5 at 336 px / 14 px), an exact-GELU
two-layer MLP projector and a small LLaMA decoder over the word-level vocabulary.

Recipe (LLaVA's two stages, preceded by the LLM pretraining LLaVA inherits):

* Stage 0, language pretraining of the LLM alone, no images. LLaVA starts from a
  pretrained LLM; ours would otherwise start from nothing, and a from-scratch decoder
  facing 576 visual tokens plus a 10-token question learns to ignore the question (it
  settles on answer priors). So the LLM first learns the task's language as text
  reading comprehension: the chat prompt with the scene's caption where the image goes
  ("... user : on a white background : a red circle at top-left , ... what colour is
  the circle ? assistant :" -> "red </s>"), the caption tokens spread over the 576
  image positions. Cheap (short sequences), and it teaches the retrieval the visual
  stages then reuse: find the named object in the context, read its attributes.
* Stage 1, "alignment / pretraining" on image captions ("describe the image ." ->
  "on a white background : a red circle at top-left , ..."), loss on caption tokens.
  LLaVA freezes a pretrained CLIP tower and the LLM here and trains only the projector.
  Our tower is not pretrained, so a frozen random tower would be useless: stage 1 trains
  everything (tower, projector, LLM).
* Stage 2, instruction tuning on one-word visual QA, loss on the response tokens only
  (answer word and `</s>`), every parameter trained.

Two efficiency devices, both exact:
* Prefix sharing: one image's prefix (`<s>` + system line + 576 visual tokens) is
  followed by several independent question/answer segments. Each segment attends to the
  prefix and to itself only, with RoPE positions continuing from the prefix as if it were
  the only question, so every segment sees exactly what a single-question prompt sees.
  6 questions per image then cost about as much as 1.
* Logits only on the text area (the 576 visual positions never need the LM head).

Grounding loss (`align_weight`, stages 1 and 2): each projected visual token, read
through the LLM's input-embedding table (a "logit lens" over the words), is trained to
name what lies under its patch: the colour, shape and grid-cell words for a patch at
least half covered by an object, the background colour word for a patch with no object.
It stands in for what a pretrained LLaVA gets from CLIP's image-text pretraining and
LLaVA's projector alignment: visual tokens that sit near the words describing them in
the LLM's embedding space - the very premise of ZSPAPrune's relevance score (cosine of
visual tokens to the mean prompt embedding), and what lets stage 0's text skills carry
over to pictures. It is an inductive bias added on purpose, stated here and in the
benchmark report; `--align-weight 0` trains without it.

Deterministic for a seed (data is a pure function of the scene index; init and step
order fixed). The final export goes through `zspa_jax.demo.export.export_hf` (HF LLaVA
format, in a temp dir) and the real converter into `zspa_jax/assets/demo_model/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

from zspa_jax.demo import scenes
from zspa_jax.demo.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, FastEncoder, build_processor, build_tokenizer

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
INFO_NAME = "demo_info.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    vision_width: int = 64
    vision_layers: int = 3  # LLaVA reads layer -2, so the last one is carried but unused
    vision_heads: int = 2
    vision_mlp: int = 256
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 2
    text_mlp: int = 352
    max_positions: int = 1024
    # data
    seed: int = 0
    text_steps: int = 1500  # stage 0: language pretraining of the LLM (no images)
    text_batch: int = 64
    text_lr: float = 3e-3
    batch: int = 32
    qa_per_image: int = 6
    stage1_steps: int = 150
    stage2_steps: int = 650
    stage1_lr: float = 2e-3
    stage2_lr: float = 1.5e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    stage2_captions: bool = True
    curriculum: float = 0.4  # fraction of each stage over which scenes grow from 1 to 5 objects
    align_weight: float = 0.2
    eval_every: int = 100
    eval_examples: int = 210

    def __post_init__(self):
        if min(self.batch, self.text_batch, self.qa_per_image) < 1 or min(
            self.text_steps, self.stage1_steps, self.stage2_steps
        ) < 0:
            raise ValueError(f"invalid TrainConfig {self}")


QUICK = dict(
    vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, text_width=32, text_layers=1,
    text_heads=2, text_kv_heads=1, text_mlp=64, text_steps=5, text_batch=4, batch=4, qa_per_image=2,
    stage1_steps=3, stage2_steps=5,
    eval_every=0, eval_examples=14,
)


def model_config(tc: TrainConfig, vocab_size: int):
    """The `models.llava.LlavaConfig` of the demo model."""
    from models.clip import CLIPVisionConfig
    from models.llama import LlamaConfig
    from models.llava import LlavaConfig

    return LlavaConfig(
        vision=CLIPVisionConfig(
            hidden_size=tc.vision_width,
            intermediate_size=tc.vision_mlp,
            num_hidden_layers=tc.vision_layers,
            num_attention_heads=tc.vision_heads,
            image_size=scenes.IMAGE_SIZE,
            patch_size=scenes.PATCH_SIZE,
            hidden_act="quick_gelu",
        ),
        text=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=tc.text_width,
            intermediate_size=tc.text_mlp,
            num_hidden_layers=tc.text_layers,
            num_attention_heads=tc.text_heads,
            num_key_value_heads=tc.text_kv_heads,
            max_position_embeddings=tc.max_positions,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
        ),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


# --------------------------------------------------------------------------- data


def patch_labels(scene: scenes.Scene, vocab: dict[str, int]) -> np.ndarray:
    """int32 [576, 3] word ids under each patch (-1 = no label) for the grounding loss.

    A patch at least half covered by one object gets (colour, shape, grid cell) - the
    words a caption uses for that object; a patch no object touches gets
    (background, -1, -1); partial patches are left unlabelled.
    """
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
    labels = np.full((g * g, 3), -1, np.int32)
    empty = (a == 0).all(axis=1)
    labels[empty, 0] = vocab[scene.background]
    for k, obj in enumerate(scene.objects):
        covered = (a == k + 1).sum(axis=1) >= (p * p) // 2
        labels[covered, 0] = vocab[obj.colour]
        labels[covered, 1] = vocab[obj.shape]
        labels[covered, 2] = vocab[obj.position]
    return labels


def text_area_length(stage: int, tc: TrainConfig) -> int:
    # caption segment <= 6 + 5 + 5 * 6 + 1 = 42 tokens; a QA segment <= 9 + 2 = 11.
    if stage == 1:
        return 48
    return 48 * tc.stage2_captions + 11 * tc.qa_per_image


class Batches:
    """Deterministic batches: batch `step` of `stage` is a pure function of (config, stage, step).

    Each row: pixels [3, 96, 96]; the text area after the shared prefix as ids, targets,
    loss weights, segment ids (0 = padding) and within-segment offsets; patch labels.
    """

    def __init__(self, tc: TrainConfig, enc: FastEncoder):
        self.tc = tc
        self.enc = enc
        self.vocab = enc.vocab

    def scene_index(self, stage: int, step: int, row: int) -> int:
        base = 0 if stage == 1 else self.tc.stage1_steps * self.tc.batch
        return base + step * self.tc.batch + row

    def segment(self, question: str, response: list[int]) -> tuple[list[int], list[int], list[float]]:
        q = self.enc.question_ids(question)
        ids = q + response
        targets = ids[1:] + [PAD_ID]
        weights = [0.0] * len(ids)
        for i in range(len(q) - 1, len(ids) - 1):  # positions whose next token is the response
            weights[i] = 1.0
        return ids, targets, weights

    def max_objects(self, stage: int, step: int) -> int:
        """Curriculum: 1 object per scene at the start of a stage, up to 5 after
        `curriculum` of its steps (binding a question to one of several objects is
        learned much faster once "find the object, read it" works)."""
        steps = self.tc.stage1_steps if stage == 1 else self.tc.stage2_steps
        ramp = self.tc.curriculum * steps
        if ramp <= 0:
            return scenes.MAX_OBJECTS
        return int(min(scenes.MAX_OBJECTS, 1 + (scenes.MAX_OBJECTS * step) // ramp))

    def row(self, stage: int, index: int, max_objects: int = scenes.MAX_OBJECTS) -> dict[str, np.ndarray]:
        scene = scenes.make_scene("train", index, max_objects)
        rng = np.random.default_rng([scenes.BASE_SEED, 99, index, self.tc.seed])
        segs = []
        if stage == 1 or self.tc.stage2_captions:
            segs.append(self.segment(scenes.CAPTION_QUESTION, self.enc.words(scene.caption()) + [EOS_ID]))
        if stage == 2:
            for qa in scenes.training_qas(scene, self.tc.qa_per_image, rng):
                segs.append(self.segment(qa.question, [self.vocab[qa.answer], EOS_ID]))
        ids, targets, weights, seg, offset = self._pack(segs, text_area_length(stage, self.tc))
        if stage == 2 and self.tc.stage2_captions:  # captions stay in the mix, at a lower weight
            weights[seg == 1] *= 0.3
        return dict(
            pixels=self.enc.pixels(scene.render()),
            ids=ids,
            targets=targets,
            weights=weights,
            seg=seg,
            offset=offset,
            labels=patch_labels(scene, self.vocab),
        )

    CAPTION_WIDTH = 40  # caption tokens stand in for the 576 image tokens in stage 0

    def text_row(self, index: int) -> dict[str, np.ndarray]:
        """Stage 0: the chat prompt with the scene's caption where the image goes.

        The caption's tokens get sorted random positions inside the 576 image slots, so
        questions sit as far from the "picture" as they will with real visual tokens.
        """
        scene = scenes.make_scene("train", index)
        rng = np.random.default_rng([scenes.BASE_SEED, 98, index, self.tc.seed])
        words = self.enc.words(scene.caption())
        head = self.enc.head
        n_img = self.enc.image_tokens
        pre_ids = np.full(len(head) + self.CAPTION_WIDTH, PAD_ID, np.int32)
        pre_pos = np.zeros_like(pre_ids)
        pre_valid = np.zeros(pre_ids.shape, bool)
        pre_ids[: len(head)] = head
        pre_pos[: len(head)] = np.arange(len(head))
        pre_ids[len(head) : len(head) + len(words)] = words
        pre_pos[len(head) : len(head) + len(words)] = len(head) + np.sort(rng.choice(n_img, len(words), replace=False))
        pre_valid[: len(head) + len(words)] = True
        qas = scenes.training_qas(scene, self.tc.qa_per_image, rng)
        segs = [self.segment(qa.question, [self.vocab[qa.answer], EOS_ID]) for qa in qas]
        ids, targets, weights, seg, offset = self._pack(segs, 11 * self.tc.qa_per_image)
        return dict(
            pre_ids=pre_ids, pre_pos=pre_pos, pre_valid=pre_valid,
            ids=ids, targets=targets, weights=weights, seg=seg, offset=offset,
        )

    def text_batch(self, step: int) -> dict[str, np.ndarray]:
        base = 50_000_000  # a range of train scenes the image stages never reach
        rows = [self.text_row(base + step * self.tc.text_batch + r) for r in range(self.tc.text_batch)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    @staticmethod
    def _pack(segs, length: int):
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

    def batch(self, stage: int, step: int) -> dict[str, np.ndarray]:
        most = self.max_objects(stage, step)
        rows = [self.row(stage, self.scene_index(stage, step, r), most) for r in range(self.tc.batch)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


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


# --------------------------------------------------------------------------- model pieces


def prefix_ids(enc: FastEncoder) -> np.ndarray:
    return np.asarray(enc.prefix_ids(), np.int32)


def _sequence_mask(prefix_len: int, seg: "jax.Array", prefix_valid: "jax.Array | None" = None) -> "jax.Array":
    """bool [B, P + T, P + T]: causal prefix; each text segment sees the prefix and itself.

    prefix_valid: bool [B, P] (stage 0's padded caption prefix) or None (all valid).
    """
    import jax.numpy as jnp

    b, t = seg.shape
    length = prefix_len + t
    q = jnp.arange(length)
    causal = q[:, None] >= q[None, :]
    seg_full = jnp.concatenate([jnp.zeros((b, prefix_len), seg.dtype), seg], axis=1)  # prefix = segment 0
    same = seg_full[:, :, None] == seg_full[:, None, :]
    in_prefix = jnp.broadcast_to(q[None, :] < prefix_len, (b, length))
    if prefix_valid is not None:
        in_prefix = in_prefix & jnp.concatenate([prefix_valid, jnp.zeros((b, t), bool)], axis=1)
        same = same & jnp.concatenate([prefix_valid, seg > 0], axis=1)[:, None, :]
    return causal[None] & (same | in_prefix[:, None, :])


def model_outputs(model, prefix: "jax.Array", pixels, ids, seg, offset):
    """Hidden states of the text area [B, T, D] and the projected visual tokens [B, N, D]."""
    import jax.numpy as jnp

    b = pixels.shape[0]
    visual = model.image_features(pixels)  # [B, N, D]
    n_head = prefix.shape[0] - visual.shape[1]
    head = model.embed_tokens(jnp.broadcast_to(prefix[:n_head], (b, n_head)))
    text = model.embed_tokens(ids)
    embeds = jnp.concatenate([head, visual.astype(head.dtype), text], axis=1)
    p = prefix.shape[0]
    positions = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), p + offset.astype(jnp.int32)], axis=1
    )
    return decode_text_area(model.language_model.model, embeds, positions, _sequence_mask(p, seg), p), visual


def decode_text_area(lm, embeds, positions, mask, p: int):
    """`LlamaModel` forward that returns only positions p.. (the text area), exactly.

    Every layer but the last runs on the whole sequence; the last layer only needs
    queries (and MLP) for the text area, since nothing reads its outputs at the 588
    prefix positions. That removes one full L x L attention per training step.
    """
    import jax.numpy as jnp

    from models.layers import dot_product_attention
    from models.llama import apply_rope, rope_inverse_frequencies

    x = embeds.astype(lm.embed_tokens.embedding[...].dtype)
    for layer in lm.layers[:-1]:
        x, _ = layer(x, positions, mask)
    last = lm.layers[-1]
    attn = last.self_attn
    h = last.input_layernorm(x)
    b, length, _ = h.shape
    inv_freq = rope_inverse_frequencies(attn.head_dim, attn.rope_theta)
    q = attn.q_proj(h[:, p:]).reshape(b, length - p, attn.num_heads, attn.head_dim)
    q = apply_rope(q, positions[:, p:], inv_freq)
    k = apply_rope(attn.k_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim), positions, inv_freq)
    v = attn.v_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim)
    out = dot_product_attention(q, k, v, mask[:, p:])
    xt = x[:, p:] + attn.o_proj(out.reshape(b, length - p, -1))
    xt = xt + last.mlp(last.post_attention_layernorm(xt))
    return lm.norm(xt)


def text_outputs(model, batch, question_start: int):
    """Stage 0 forward (no image): hidden states of the text area [B, T, D]."""
    import jax.numpy as jnp

    lm = model.language_model
    embeds = jnp.concatenate([lm.embed(batch["pre_ids"]), lm.embed(batch["ids"])], axis=1)
    positions = jnp.concatenate([batch["pre_pos"], question_start + batch["offset"]], axis=1).astype(jnp.int32)
    p = batch["pre_ids"].shape[1]
    mask = _sequence_mask(p, batch["seg"], batch["pre_valid"])
    return decode_text_area(lm.model, embeds, positions, mask, p)


def _lm_loss(model, hidden, batch):
    """(weighted next-token CE, accuracy on the weighted non-EOS targets = answers)."""
    import jax.numpy as jnp
    import optax

    logits = model.language_model.logits(hidden)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    answer = (w > 0) & (batch["targets"] != EOS_ID)
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) & answer
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), jnp.sum(hit) / jnp.maximum(jnp.sum(answer), 1)


def text_loss_fn(state, graphdef, question_start: int, batch):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    loss, acc = _lm_loss(model, text_outputs(model, batch, question_start), batch)
    return loss, {"lm": loss, "acc": acc}


def loss_fn(state, graphdef, prefix, batch, align_weight: float):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    model = nnx.merge(graphdef, state)
    hidden, visual = model_outputs(model, prefix, batch["pixels"], batch["ids"], batch["seg"], batch["offset"])
    lm_loss, acc = _lm_loss(model, hidden, batch)
    metrics = {"lm": lm_loss, "acc": acc}
    loss = lm_loss
    if align_weight:
        table = model.language_model.model.embed_tokens.embedding[...]  # [V, D]
        lens = jax.nn.log_softmax(jnp.einsum("bnd,vd->bnv", visual, table), axis=-1)
        labels = batch["labels"]  # [B, N, 3]
        valid = labels >= 0
        picked = jnp.take_along_axis(lens, jnp.maximum(labels, 0), axis=-1)  # [B, N, 3]
        align = -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        metrics["align"] = align
        loss = loss + align_weight * align
    return loss, metrics


def make_train_step(graphdef, optimizer, align_weight: float, text_only: bool = False):
    """jit(step)(state, opt_state, prefix, batch); for stage 0 `prefix` is the question's
    first RoPE position (a static int) instead of the prefix ids."""
    import jax
    import optax

    def objective(state, prefix, batch):
        if text_only:
            return text_loss_fn(state, graphdef, prefix, batch)
        return loss_fn(state, graphdef, prefix, batch, align_weight)

    @partial(jax.jit, donate_argnums=(0, 1), static_argnums=(2,) if text_only else ())
    def step(state, opt_state, prefix, batch):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state, prefix, batch)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        return state, opt_state, metrics

    return step


def make_optimizer(tc: TrainConfig, steps: int, lr: float):
    import optax

    warmup = max(1, int(steps * tc.warmup_frac))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay),
    )


# --------------------------------------------------------------------------- evaluation


def answer_batch(graphdef, state, enc: FastEncoder, exs: list, batch: int = 35) -> list[str]:
    """Greedy one-word answers (argmax at the answer position), right-padded batches."""
    import jax

    id_to_word = {i: w for w, i in enc.vocab.items()}
    fn = _answer_fn()
    prefix = prefix_ids(enc)
    out: list[str] = []
    for s in range(0, len(exs), batch):
        chunk = exs[s : s + batch]
        qs = [enc.question_ids(e.qa.question) for e in chunk]
        width = 16
        ids = np.full((batch, width), PAD_ID, np.int32)
        last = np.zeros(batch, np.int32)
        pixels = np.zeros((batch, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), np.float32)
        for r, (e, q) in enumerate(zip(chunk, qs)):
            ids[r, : len(q)] = q
            last[r] = len(q) - 1
            pixels[r] = enc.pixels(e.image())
        pred = np.asarray(fn(graphdef, state, prefix, pixels, ids, last))
        out.extend(id_to_word[int(t)] for t in pred[: len(chunk)])
    return out


_ANSWER_FN = None


def _answer_fn():
    global _ANSWER_FN
    if _ANSWER_FN is None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        @partial(jax.jit, static_argnums=0)
        def fn(graphdef, state, prefix, pixels, ids, last):
            model = nnx.merge(graphdef, state)
            seg = jnp.ones(ids.shape, jnp.int32)
            offset = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
            hidden, _ = model_outputs(model, prefix, pixels, ids, seg, offset)
            h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
            return jnp.argmax(model.language_model.logits(h), axis=-1)

        _ANSWER_FN = fn
    return _ANSWER_FN


def accuracy_report(exs: list, answers: list[str]) -> dict:
    per: dict[str, list[int]] = {t: [] for t in scenes.QUESTION_TYPES}
    for e, a in zip(exs, answers):
        per[e.qa.qtype].append(int(a == e.qa.answer))
    report = {"overall": float(np.mean([int(a == e.qa.answer) for e, a in zip(exs, answers)])), "n": len(exs)}
    report["per_type"] = {t: float(np.mean(v)) for t, v in per.items() if v}
    return report


# --------------------------------------------------------------------------- driver


def train(tc: TrainConfig, progress: bool = True, log=print):
    """Train from scratch; returns (model, llava_config, history dict)."""
    import jax
    import optax
    from flax import nnx
    from tqdm.auto import tqdm

    from models.llava import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    enc = FastEncoder(tokenizer)
    cfg = model_config(tc, len(tokenizer))
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(tc.seed))
    init_model(model, tc.seed)
    graphdef, state = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    log(f"demo LLaVA: {n_params:,} parameters; vocab {len(tokenizer)}; {cfg.image_seq_length} visual tokens")
    data = Batches(tc, enc)
    prefix = jax.numpy.asarray(prefix_ids(enc))
    val = scenes.examples("val", tc.eval_examples)
    history: dict = {"params": int(n_params), "stages": {}}
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    names = {0: "language pretraining, no images", 1: "captions", 2: "visual QA"}
    question_start = int(prefix.shape[0])
    for stage, steps, lr in ((0, tc.text_steps, tc.text_lr), (1, tc.stage1_steps, tc.stage1_lr), (2, tc.stage2_steps, tc.stage2_lr)):
        if steps == 0:
            continue
        optimizer = make_optimizer(tc, steps, lr)
        opt_state = optimizer.init(state)
        train_step = make_train_step(graphdef, optimizer, tc.align_weight, text_only=stage == 0)
        losses = []
        t0 = time.perf_counter()
        bar = tqdm(
            prefetch(data.text_batch if stage == 0 else partial(data.batch, stage), range(steps)),
            total=steps,
            desc=f"stage {stage} ({names[stage]})",
            disable=not progress,
            unit="step",
            mininterval=2.0,
        )
        evals = []
        for step, batch in enumerate(bar):
            state, opt_state, m = train_step(state, opt_state, question_start if stage == 0 else prefix, batch)
            m = {k: float(v) for k, v in m.items()}
            losses.append(m)
            bar.set_postfix({k: f"{v:.3f}" for k, v in m.items() if k != "grad_norm"})
            if stage == 2 and tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < steps:
                acc = accuracy_report(val, answer_batch(graphdef, state, enc, val))
                evals.append({"step": step + 1, **acc})
                bar.write(f"  step {step + 1}: val accuracy {acc['overall']:.3f} " + json.dumps(acc["per_type"]))
        seconds = time.perf_counter() - t0
        tail = losses[-min(20, len(losses)) :]
        history["stages"][stage] = {
            "steps": steps,
            "seconds": seconds,
            "final": {k: float(np.mean([m[k] for m in tail])) for k in tail[0]},
            "first": losses[0],
            "evals": evals,
        }
        log(f"stage {stage}: {steps} steps in {seconds:.0f} s; final (mean of last {len(tail)}) "
            + json.dumps({k: round(v, 4) for k, v in history["stages"][stage]["final"].items()}))
    history["seconds"] = time.perf_counter() - start
    history["cpu_seconds"] = _cpu_seconds() - cpu0
    acc = accuracy_report(val, answer_batch(graphdef, state, enc, val))
    history["val"] = acc
    log(f"val accuracy {acc['overall']:.3f} " + json.dumps(acc["per_type"]))
    return nnx.merge(graphdef, state), cfg, history


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): a load-independent cost."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def init_model(model, seed: int) -> None:
    """Initialisation tweaks on top of Flax's defaults (lecun-normal kernels, zero biases,
    1/sqrt(D) embeddings, which suit these narrow widths better than LLaMA's 0.02):
    the tower's position embeddings start as 2-D sin-cos codes of the patch grid (CLS
    gets zeros), so patch tokens know where they are from step 0."""
    emb = model.vision_tower.embeddings.position_embedding.embedding
    n, d = emb[...].shape
    emb[...] = jnp_sincos_2d(scenes.GRID, d, cls=n - scenes.GRID**2).astype(emb[...].dtype)


def jnp_sincos_2d(grid: int, dim: int, cls: int = 1):
    """[cls + grid*grid, dim] 2-D sine-cosine position codes (MAE style), RMS ~ 0.7."""
    import jax.numpy as jnp

    quarter = dim // 4
    omega = 1.0 / (10000 ** (np.arange(quarter) / max(quarter, 1)))
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    out = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None]
        out += [np.sin(angles), np.cos(angles)]
    codes = np.concatenate(out, axis=1)
    codes = np.pad(codes, ((0, 0), (0, dim - codes.shape[1])))
    return jnp.asarray(np.concatenate([np.zeros((cls, dim)), codes]), jnp.float32)


def ship(model, cfg, history: dict, tc: TrainConfig, out: Path, log=print) -> dict:
    """Export to HF format in a temp dir, convert with the real converter into `out`."""
    from convert.llava import convert
    from zspa_jax.demo.export import export_hf

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    with tempfile.TemporaryDirectory(prefix="zspa-demo-hf-") as tmp:
        export_hf(model, cfg, tokenizer, processor, tmp)
        summary = convert(tmp, out, dtype="float32", force=True, progress=False)
    info = {
        "description": "demo LLaVA trained from scratch on zspa_jax.demo.scenes (procedural shapes VQA)",
        "prompt_template": scenes.chat_prompt("{question}"),
        "example_questions": [
            "what colour is the circle ?",
            "what shape is the red object ?",
            "where is the blue star ?",
            "is there a green square ?",
            "how many triangles are there ?",
            "how many shapes are there ?",
            "what colour is the background ?",
            scenes.CAPTION_QUESTION,
        ],
        "train_config": dataclasses.asdict(tc),
        "history": history,
        "parameters": summary["parameters"],
    }
    (Path(out) / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    log(f"shipped {summary['parameters']:,} parameters ({summary['bytes'] / 2**20:.1f} MiB f32) -> {out}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zspa_jax.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ASSET_DIR), help=f"converted checkpoint directory (default {ASSET_DIR})")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (smoke test)")
    parser.add_argument("--no-export", action="store_true", help="train and evaluate only")
    parser.add_argument("--test-examples", type=int, default=700, help="test questions scored at the end (0: skip)")
    for field in dataclasses.fields(TrainConfig):
        kind = type(field.default)
        if kind is bool:
            kind = lambda v: v.lower() in ("1", "true", "yes", "on")  # noqa: E731
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None, metavar=type(field.default).__name__.upper())
    args = parser.parse_args(argv)
    overrides = dict(QUICK) if args.quick else {}
    overrides.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None})
    tc = TrainConfig(**overrides)
    print(f"config: {json.dumps(dataclasses.asdict(tc))}")
    model, cfg, history = train(tc)
    if args.test_examples:
        from flax import nnx

        graphdef, state = nnx.split(model)
        enc = FastEncoder()
        test = scenes.examples("test", args.test_examples)
        acc = accuracy_report(test, answer_batch(graphdef, state, enc, test))
        history["test"] = acc
        print(f"test accuracy ({len(test)} questions) {acc['overall']:.3f} " + json.dumps(acc["per_type"]))
    if not args.no_export:
        ship(model, cfg, history, tc, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
