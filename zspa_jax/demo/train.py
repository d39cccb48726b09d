"""Train the small demo LLaVA on the procedural shapes task, export it, ship it.

    python -m zspa_jax.demo.train [--out DIR] [--quick] [--seed N] ...

Model: our `models.llava` LLaVA with a narrow CLIP-style ViT (96 px images, 4 px patches
-> 24 x 24 = 576 visual tokens, like LLaVA-1.5 at 336 px / 14 px), an exact-GELU
two-layer MLP projector and a small LLaMA decoder over the word-level vocabulary.

Nothing here is pretrained, and two CPU cores allow a few hundred image steps, so the
recipe is LLaVA's two stages preceded by a cheap stand-in for the two things LLaVA
inherits (a pretrained LLM, and CLIP features that already mean something):

* Stage 0, LLM pretraining on *symbolic scenes* (no images, no tower). Each patch is
  given to the LLM as the word embeddings of what lies under it: for each of the (at
  most two) objects covering it, E[colour] + E[shape] + E[grid cell of the object],
  weighted by the fraction of the patch it covers; the background colour word weighted
  by the rest; and E["a"] on the patch holding an object's centre - one marker per
  object instance, since counting patches cannot count objects of different sizes.
  Tokens sit at their real RoPE positions among the 576 image slots (every object patch
  plus random background patches, to keep sequences short). The LLM learns the chat
  format, captions and the questions from "perfect vision" at a tenth of the cost of an
  image step. (Trained from scratch on pixels, a decoder settles on answer priors and
  ignores the question for a long time.)
* Stage 1, alignment: like LLaVA's first stage the LLM is frozen; the projector - and,
  since ours is random, the tower - learn to produce each patch's symbolic token from
  pixels (squared error against the frozen embedding table's mixture). The LLM's forward
  pass is not needed, so this stage is cheap.
* Stage 2, instruction tuning on one-word visual QA (loss on the response tokens only:
  answer word and `</s>`), captions kept in the mix at a lower weight, the alignment
  loss kept as a regulariser (`align_weight`); everything trains.

The symbolic targets make visual tokens sit near the words that describe them in the
LLM's input-embedding space. That stands in for CLIP-style image-text alignment, and it
is also the premise of ZSPAPrune's relevance score (cosine of each visual token to the
mean prompt embedding): an inductive bias chosen on purpose and stated in the benchmark
report - results on this model show the method where its premise holds, not evidence
about real CLIP features.

Attention starts from a "mimetic" initialisation (Trockman & Kolter, 2023): each
decoder layer's key projection starts equal to its query projection (so W_q W_k^T is
positive semi-definite: tokens attend to tokens that look like them) and the output
projection starts as the transpose of the value projection (attention starts by
copying). Retrieval - find the visual tokens that carry the question's words - is the
core skill here, and this start makes it emerge in hundreds instead of thousands of
steps.

Two efficiency devices, both exact:
* Prefix sharing: one image's prefix (`<s>` + system line + 576 visual tokens) is
  followed by several independent question/answer segments. Each segment attends to the
  prefix and to itself only, with RoPE positions continuing from the prefix as if it
  were the only question, so every segment sees exactly what a single-question prompt
  sees; the 8 questions per image then cost little more than 1. Stage 0 (short prefix)
  has its own count, `--symbolic-qa-per-image` (default 8). The final accuracy is bound
  by the tower's shape recognition (benchmarks/demo_readout.py measures it on the
  shipped model).
* The last decoder layer runs on the text area only (nothing reads its outputs at the
  576 visual positions), and logits are computed there only.

Deterministic for a seed (data is a pure function of the scene index; init and step
order fixed). The final export goes through `zspa_jax.demo.export.export_hf` (HF LLaVA
format, in a temp dir) and the real converter into `zspa_jax/assets/demo_model/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import sys
import tempfile
import threading
import time
from functools import cache, partial
from pathlib import Path

import numpy as np

from zspa_jax.demo import scenes
from zspa_jax.demo.tokenizer import EOS_ID, IMAGE_ID, PAD_ID, FastEncoder, build_processor, build_tokenizer

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
INFO_NAME = "demo_info.json"
QA_SLOT = 11  # tokens a question segment can take: "what shape is the red object ? assistant :" + answer + </s>
CAPTION_SLOT = 48  # "describe the image . assistant :" + caption (<= 35 words) + </s>
SLOTS = 8  # words mixed into one symbolic patch token: background, 2 x (colour, shape, cell), centre marker


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    vision_width: int = 64
    vision_layers: int = 3
    vision_feature_layer: int = -2  # LLaVA-1.5 reads layer -2: the last layer is carried but unused
    vision_heads: int = 2
    vision_mlp: int = 256
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    text_mlp: int = 352
    max_positions: int = 1024
    # data and schedule
    seed: int = 0
    qa_per_image: int = 8
    captions: bool = True  # a caption segment in stage 0 / stage 2 sequences too
    symbolic_steps: int = 1200  # stage 0
    symbolic_batch: int = 16
    symbolic_tokens: int = 112  # patches shown per symbolic scene (objects + sampled background)
    symbolic_qa_per_image: int = 8  # stage 0's own count (see the module docstring on 16)
    symbolic_lr: float = 3e-3
    batch: int = 16  # stages 1 and 2
    stage1_steps: int = 700
    stage2_steps: int = 380
    stage1_lr: float = 3e-3
    stage2_lr: float = 1.5e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    align_weight: float = 1.0
    eval_every: int = 100
    eval_examples: int = 210

    def __post_init__(self):
        counts = (self.batch, self.symbolic_batch, self.qa_per_image, self.symbolic_qa_per_image, self.symbolic_tokens)
        if min(counts) < 1 or min(self.symbolic_steps, self.stage1_steps, self.stage2_steps) < 0:
            raise ValueError(f"invalid TrainConfig {self}")


QUICK = dict(
    vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, text_width=32, text_layers=1,
    text_heads=2, text_kv_heads=1, text_mlp=64, qa_per_image=2, symbolic_qa_per_image=2, symbolic_steps=4,
    symbolic_batch=4, symbolic_tokens=96, batch=4, stage1_steps=3, stage2_steps=5, eval_every=0, eval_examples=14,
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
        vision_feature_layer=tc.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


# --------------------------------------------------------------------------- data


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
    return np.stack([(a == k + 1).mean(axis=1) for k in range(len(scene.objects))], axis=1).astype(np.float32)


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
    attributes = np.asarray([[vocab[o.colour], vocab[o.shape], vocab[o.position]] for o in scene.objects], np.int32)
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


def symbolic_subset(sym_ids, sym_w, width: int, rng: np.random.Generator, n_head: int) -> dict[str, np.ndarray]:
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

    def segment(self, question: str, response: list[int]) -> tuple[list[int], list[int], list[float]]:
        q = self.enc.question_ids(question)
        ids = q + response
        targets = ids[1:] + [PAD_ID]
        weights = [0.0] * len(ids)
        for i in range(len(q) - 1, len(ids) - 1):  # positions whose next token is the response
            weights[i] = 1.0
        return ids, targets, weights

    def text_area(self, scene: scenes.Scene, rng: np.random.Generator, stage: int) -> dict[str, np.ndarray]:
        segs = []
        if self.tc.captions:
            segs.append(self.segment(scenes.CAPTION_QUESTION, self.enc.words(scene.caption()) + [EOS_ID]))
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
            out.update(symbolic_subset(sym_ids, sym_w, self.tc.symbolic_tokens, rng, len(self.enc.head)))
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


# --------------------------------------------------------------------------- model pieces


def prefix_ids(enc: FastEncoder) -> np.ndarray:
    return np.asarray(enc.prefix_ids(), np.int32)


def _sequence_mask(prefix_len: int, seg):
    """bool [B, P + T, P + T]: causal prefix; each text segment sees the prefix and itself."""
    import jax.numpy as jnp

    b, t = seg.shape
    length = prefix_len + t
    q = jnp.arange(length)
    causal = q[:, None] >= q[None, :]
    seg_full = jnp.concatenate([jnp.zeros((b, prefix_len), seg.dtype), seg], axis=1)  # prefix = segment 0
    same = seg_full[:, :, None] == seg_full[:, None, :]
    in_prefix = jnp.broadcast_to(q[None, :] < prefix_len, (b, length))
    return causal[None] & (same | in_prefix[:, None, :])


def decode_text_area(lm, embeds, positions, mask, p: int):
    """`LlamaModel` forward that returns only positions p.. (the text area), exactly.

    Every layer but the last runs on the whole sequence; the last layer only needs
    queries (and MLP) for the text area, since nothing reads its outputs at the prefix
    positions. That removes one full L x L attention per training step.
    """
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


def symbolic_tokens(table, ids, weights):
    """sum_k weights[..., k] * table[ids[..., k]]: [..., SLOTS] -> [..., D]."""
    import jax.numpy as jnp

    return jnp.einsum("...k,...kd->...d", weights, table[ids])


def _text_area_hidden(model, prefix, image_tokens, image_positions, ids, seg, offset):
    """Hidden states [B, T, D] of the text area after `<s>` + system line + the image tokens
    [B, M, D] at RoPE positions `image_positions` [B, M]; segments start after the full prefix."""
    import jax.numpy as jnp

    lm = model.language_model
    b = ids.shape[0]
    n_head = prefix.shape[0] - scenes.GRID**2
    head = lm.embed(jnp.broadcast_to(prefix[:n_head], (b, n_head)))
    embeds = jnp.concatenate([head, image_tokens.astype(head.dtype), lm.embed(ids)], axis=1)
    positions = jnp.concatenate(
        [
            jnp.broadcast_to(jnp.arange(n_head, dtype=jnp.int32), (b, n_head)),
            image_positions.astype(jnp.int32),
            prefix.shape[0] + offset.astype(jnp.int32),
        ],
        axis=1,
    )
    p = n_head + image_tokens.shape[1]
    return decode_text_area(lm.model, embeds, positions, _sequence_mask(p, seg), p)


def model_outputs(model, prefix, pixels, ids, seg, offset):
    """Image stages: hidden states of the text area [B, T, D] and the visual tokens [B, N, D]."""
    import jax.numpy as jnp

    visual = model.image_features(pixels)  # [B, N, D]
    b, n = visual.shape[:2]
    slots = jnp.broadcast_to(prefix.shape[0] - n + jnp.arange(n, dtype=jnp.int32), (b, n))
    return _text_area_hidden(model, prefix, visual, slots, ids, seg, offset), visual


def symbolic_outputs(model, prefix, batch):
    """Stage 0: the symbolic patch tokens at their positions stand in for the visual tokens."""
    table = model.language_model.model.embed_tokens.embedding[...]
    sym = symbolic_tokens(table, batch["sym_ids"], batch["sym_w"])
    return _text_area_hidden(model, prefix, sym, batch["sym_pos"], batch["ids"], batch["seg"], batch["offset"])


def _lm_loss(model, hidden, batch):
    """(weighted next-token CE, accuracy on the weighted non-EOS targets = answers)."""
    import jax.numpy as jnp
    import optax

    logits = model.language_model.logits(hidden)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    answer = (w >= 1.0) & (batch["targets"] != EOS_ID)  # QA answers (captions in QA stages weigh 0.3)
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) & answer
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), jnp.sum(hit) / jnp.maximum(jnp.sum(answer), 1)


def alignment_loss(visual, table, batch):
    """Squared distance of each visual token [B, N, D] to its patch's symbolic token, plus a
    word-level cross-entropy through the embedding table (the "logit lens") that asks the
    main object's colour, shape and cell word to win, each on its own: the squared error
    alone is dominated by colour, the easiest attribute, and learns shape and cell slowly.
    The table is a fixed target here: no gradient flows into it."""
    import jax
    import jax.numpy as jnp

    table = jax.lax.stop_gradient(table)
    target = symbolic_tokens(table, batch["sym_ids"], batch["sym_w"])
    mse = jnp.mean(jnp.sum((visual - target) ** 2, axis=-1))
    logp = jax.nn.log_softmax(jnp.einsum("bnd,vd->bnv", visual, table), axis=-1)
    words = batch["sym_ids"][..., 1:4]  # [B, N, 3] colour, shape, cell of the main object
    main = batch["sym_w"][..., 1] > 0.5  # patches mostly covered by one object
    picked = jnp.take_along_axis(logp, words, axis=-1)  # [B, N, 3]
    ce = -jnp.sum(jnp.where(main[..., None], picked, 0.0)) / jnp.maximum(3 * jnp.sum(main), 1)
    return mse + ce


def loss_fn(state, graphdef, prefix, batch, stage: int, align_weight: float):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    if stage == 0:
        lm_loss, acc = _lm_loss(model, symbolic_outputs(model, prefix, batch), batch)
        return lm_loss, {"lm": lm_loss, "acc": acc}
    table = model.language_model.model.embed_tokens.embedding[...]
    if stage == 1:  # alignment: the tower + projector learn to produce the symbolic tokens (LLM frozen)
        align = alignment_loss(model.image_features(batch["pixels"]), table, batch)
        return align, {"align": align}
    hidden, visual = model_outputs(model, prefix, batch["pixels"], batch["ids"], batch["seg"], batch["offset"])
    lm_loss, acc = _lm_loss(model, hidden, batch)
    metrics = {"lm": lm_loss, "acc": acc}
    loss = lm_loss
    if align_weight:
        align = alignment_loss(visual, table, batch)
        metrics["align"] = align
        loss = loss + align_weight * align
    return loss, metrics


def make_train_step(graphdef, optimizer, stage: int, align_weight: float):
    """jit(step)(state, opt_state, prefix, batch) -> (state, opt_state, metrics)."""
    import jax
    import optax

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(state, opt_state, prefix, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state, graphdef, prefix, batch, stage, align_weight
        )
        updates, opt_state = optimizer.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        return state, opt_state, metrics

    return step


def make_optimizer(tc: TrainConfig, steps: int, lr: float, state=None, frozen: str | None = None):
    """AdamW with warmup + cosine decay; parameters whose path contains `frozen` get no update."""
    import jax
    import optax

    warmup = max(1, int(steps * tc.warmup_frac))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05)
    adamw = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay),
    )
    if frozen is None:
        return adamw
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(frozen == str(getattr(k, "key", k)) for k in path) else "train", state
    )
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- evaluation


def answer_batch(
    graphdef, state, enc: FastEncoder, exs: list, batch: int = 35, symbolic_tokens: int | None = None
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
                    *patch_words(e.scene, enc.vocab), symbolic_tokens,
                    np.random.default_rng([scenes.BASE_SEED, 98, e.scene.index]), len(enc.head),
                )
                for e in chunk
            ]
            rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch - len(chunk))
            inputs = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        pred = np.asarray(_answer_fn()(graphdef, symbolic_tokens is not None, state, prefix, inputs, ids, last))
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
            hidden = symbolic_outputs(model, prefix, {**inputs, "ids": ids, "seg": seg, "offset": offset})
        else:
            hidden, _ = model_outputs(model, prefix, inputs, ids, seg, offset)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return jnp.argmax(model.language_model.logits(h), axis=-1)

    return fn


READOUT_GROUPS = {"colour": tuple(scenes.COLOURS), "shape": scenes.SHAPES, "cell": scenes.POSITIONS}


def patch_readout_accuracy(visual: np.ndarray, table: np.ndarray, vocab: dict, words: list) -> dict[str, float]:
    """How well visual tokens [S, 576, D] name what they show, read through the LLM's
    embedding table [V, D]. `words` holds each scene's `patch_words` (ids, weights). On
    patches mostly covered by one object: how often the word of each group (colour, shape,
    cell) with the largest dot product is that object's."""
    group_ids = {g: np.asarray([vocab[x] for x in group]) for g, group in READOUT_GROUPS.items()}
    hits: dict[str, list[np.ndarray]] = {g: [] for g in READOUT_GROUPS}
    for (ids, w), v in zip(words, visual):
        main = w[:, 1] > 0.5
        for slot, (group, word_ids) in enumerate(group_ids.items()):
            hits[group].append(word_ids[(v[main] @ table[word_ids].T).argmax(1)] == ids[main, 1 + slot])
    return {g: float(np.concatenate(h).mean()) for g, h in hits.items()}


def accuracy_report(exs: list, answers: list[str]) -> dict:
    per: dict[str, list[int]] = {t: [] for t in scenes.QUESTION_TYPES}
    for e, a in zip(exs, answers):
        per[e.qa.qtype].append(int(a == e.qa.answer))
    report = {"overall": float(np.mean([int(a == e.qa.answer) for e, a in zip(exs, answers)])), "n": len(exs)}
    report["per_type"] = {t: float(np.mean(v)) for t, v in per.items() if v}
    return report


# --------------------------------------------------------------------------- driver


STAGES = {0: "symbolic scenes, LLM only", 1: "alignment, LLM frozen", 2: "visual QA"}


def train(tc: TrainConfig, progress: bool = True, log=print):
    """Train from scratch; returns (model, llava_config, history dict)."""
    import jax
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
    readout_scenes = [ex.scene for ex in val[:48]]
    readout_pixels = np.stack([enc.pixels(sc.render()) for sc in readout_scenes])
    readout_words = [patch_words(sc, enc.vocab) for sc in readout_scenes]
    features = jax.jit(lambda st, px: nnx.merge(graphdef, st).image_features(px))
    history: dict = {"parameters": int(n_params), "stages": {}}
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    schedule = ((0, tc.symbolic_steps, tc.symbolic_lr), (1, tc.stage1_steps, tc.stage1_lr), (2, tc.stage2_steps, tc.stage2_lr))
    for stage, steps, lr in schedule:
        if steps == 0:
            continue
        optimizer = make_optimizer(tc, steps, lr, state, frozen="language_model" if stage == 1 else None)
        opt_state = optimizer.init(state)
        train_step = make_train_step(graphdef, optimizer, stage, tc.align_weight)
        losses = []
        t0, c0 = time.perf_counter(), _cpu_seconds()
        bar = tqdm(
            prefetch(partial(data.batch, stage), range(steps)),
            total=steps,
            desc=f"stage {stage} ({STAGES[stage]})",
            disable=not progress,
            unit="step",
            mininterval=2.0,
        )
        evals = []
        for step, batch in enumerate(bar):
            state, opt_state, m = train_step(state, opt_state, prefix, batch)
            m = {k: float(v) for k, v in m.items()}
            losses.append(m)
            bar.set_postfix({k: f"{v:.3f}" for k, v in m.items() if k != "grad_norm"}, refresh=False)
            if stage == 2 and tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < steps:
                acc = accuracy_report(val, answer_batch(graphdef, state, enc, val))
                evals.append({"step": step + 1, **acc})
                bar.write(f"  step {step + 1}: val accuracy {acc['overall']:.3f} " + _fmt(acc["per_type"]))
        tail = losses[-min(20, len(losses)) :]
        history["stages"][str(stage)] = {
            "name": STAGES[stage],
            "steps": steps,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": _cpu_seconds() - c0,
            "first": losses[0],
            "final": {k: float(np.mean([m[k] for m in tail])) for k in tail[0]},
            "evals": evals,
        }
        h = history["stages"][str(stage)]
        log(f"stage {stage} ({STAGES[stage]}): {steps} steps in {h['seconds']:.0f} s "
            f"({h['cpu_seconds']:.0f} CPU-s); final (mean of last {len(tail)}) {_fmt(h['final'])}")
        if stage == 0:  # the ceiling a perfect tower would give this LLM
            answers = answer_batch(graphdef, state, enc, val, symbolic_tokens=tc.symbolic_tokens)
            h["symbolic_val"] = accuracy_report(val, answers)
            log(f"  val accuracy from perfect symbolic tokens {h['symbolic_val']['overall']:.3f} "
                + _fmt(h["symbolic_val"]["per_type"]))
        else:
            table = np.asarray(nnx.merge(graphdef, state).language_model.model.embed_tokens.embedding[...])
            visual = np.asarray(features(state, readout_pixels))
            h["patch_readout"] = patch_readout_accuracy(visual, table, enc.vocab, readout_words)
            log(f"  per-patch readout of the visual tokens {_fmt(h['patch_readout'])}")
    history["seconds"] = time.perf_counter() - start
    history["cpu_seconds"] = _cpu_seconds() - cpu0
    acc = accuracy_report(val, answer_batch(graphdef, state, enc, val))
    history["val"] = acc
    log(f"training took {history['seconds']:.0f} s ({history['cpu_seconds']:.0f} CPU-s); "
        f"val accuracy {acc['overall']:.3f} {_fmt(acc['per_type'])}")
    return nnx.merge(graphdef, state), cfg, history


def _fmt(d: dict) -> str:
    return json.dumps({k: round(v, 3) for k, v in d.items()})


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): a load-independent cost."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def init_model(model, seed: int) -> None:
    """Initialisation tweaks on top of Flax's defaults (lecun-normal kernels, zero biases,
    1/sqrt(D) embeddings, which suit these narrow widths better than LLaMA's 0.02): the
    tower's position embeddings start as 2-D sin-cos codes of the patch grid (CLS gets
    zeros), so patch tokens know where they are from step 0. `seed` is unused (the
    codes are deterministic); kept for symmetry with the module's `Rngs`."""
    emb = model.vision_tower.embeddings.position_embedding.embedding
    n, d = emb[...].shape
    emb[...] = sincos_2d(scenes.GRID, d, cls=n - scenes.GRID**2).astype(emb[...].dtype)
    for layer in model.language_model.model.layers:  # mimetic attention init (module docstring)
        mimetic_init(layer.self_attn)


def mimetic_init(attn) -> None:
    """k_proj := q_proj (the first query head of each group under GQA) and o_proj := v_proj^T
    (averaged over the group), so W_q W_k^T >= 0 and W_v W_o ~ I at initialisation."""
    import jax.numpy as jnp

    d = attn.q_proj.kernel[...].shape[0]
    kv, dh = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // kv
    q = attn.q_proj.kernel[...].reshape(d, kv, group, dh)
    attn.k_proj.kernel[...] = q[:, :, 0, :].reshape(d, kv * dh)
    v_t = attn.v_proj.kernel[...].reshape(d, kv, 1, dh).transpose(1, 2, 3, 0)  # [kv, 1, dh, d]
    attn.o_proj.kernel[...] = jnp.broadcast_to(v_t / group, (kv, group, dh, d)).reshape(kv * group * dh, d)


def sincos_2d(grid: int, dim: int, cls: int = 1):
    """[cls + grid*grid, dim] 2-D sine-cosine position codes (MAE style), rows first."""
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
        "description": "demo LLaVA trained from scratch on zspa_jax.demo.scenes (procedural shapes visual QA)",
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
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=kind, default=None, metavar=type(field.default).__name__.upper()
        )
    args = parser.parse_args(argv)
    overrides = dict(QUICK) if args.quick else {}
    overrides.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    )
    tc = TrainConfig(**overrides)
    print(f"config: {json.dumps(dataclasses.asdict(tc))}")
    model, cfg, history = train(tc)
    if args.test_examples:
        from flax import nnx

        graphdef, state = nnx.split(model)
        test = scenes.examples("test", args.test_examples)
        acc = accuracy_report(test, answer_batch(graphdef, state, FastEncoder(), test))
        history["test"] = acc
        print(f"test accuracy ({len(test)} questions) {acc['overall']:.3f} {_fmt(acc['per_type'])}")
    if not args.no_export:
        ship(model, cfg, history, tc, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
