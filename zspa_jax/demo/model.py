"""The demo model: its `LlavaConfig` and initialisation, the training forward passes, the
stages' losses, the optimizer and the jitted train step."""

from __future__ import annotations

from functools import partial

import numpy as np

from zspa_jax.demo import scenes
from zspa_jax.demo.config import TrainConfig
from zspa_jax.demo.tokenizer import EOS_ID, IMAGE_ID


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


def init_model(model, seed: int) -> None:
    """Initialisation tweaks on top of Flax's defaults (lecun-normal kernels, zero biases,
    1/sqrt(D) embeddings, which suit these narrow widths better than LLaMA's 0.02): the
    tower's position embeddings start as 2-D sin-cos codes of the patch grid (CLS gets
    zeros), so patch tokens know where they are from step 0. `seed` is unused (the
    codes are deterministic); kept for symmetry with the module's `Rngs`."""
    emb = model.vision_tower.embeddings.position_embedding.embedding
    n, d = emb[...].shape
    emb[...] = sincos_2d(scenes.GRID, d, cls=n - scenes.GRID**2).astype(emb[...].dtype)
    for layer in (
        model.language_model.model.layers
    ):  # mimetic attention init (zspa_jax.demo.train's docstring)
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
    attn.o_proj.kernel[...] = jnp.broadcast_to(v_t / group, (kv, group, dh, d)).reshape(
        kv * group * dh, d
    )


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


def _sequence_mask(prefix_len: int, seg):
    """bool [B, P + T, P + T]: causal prefix; each text segment sees the prefix and itself."""
    import jax.numpy as jnp

    b, t = seg.shape
    length = prefix_len + t
    q = jnp.arange(length)
    causal = q[:, None] >= q[None, :]
    seg_full = jnp.concatenate(
        [jnp.zeros((b, prefix_len), seg.dtype), seg], axis=1
    )  # prefix = segment 0
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
    k = apply_rope(
        attn.k_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim), positions, inv_freq
    )
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
    return _text_area_hidden(
        model, prefix, sym, batch["sym_pos"], batch["ids"], batch["seg"], batch["offset"]
    )


def _lm_loss(model, hidden, batch):
    """(weighted next-token CE, accuracy on the weighted non-EOS targets = answers)."""
    import jax.numpy as jnp
    import optax

    logits = model.language_model.logits(hidden)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    answer = (w >= 1.0) & (
        batch["targets"] != EOS_ID
    )  # QA answers (captions in QA stages weigh 0.3)
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) & answer
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), jnp.sum(hit) / jnp.maximum(
        jnp.sum(answer), 1
    )


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
    if (
        stage == 1
    ):  # alignment: the tower + projector learn to produce the symbolic tokens (LLM frozen)
        align = alignment_loss(model.image_features(batch["pixels"]), table, batch)
        return align, {"align": align}
    hidden, visual = model_outputs(
        model, prefix, batch["pixels"], batch["ids"], batch["seg"], batch["offset"]
    )
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
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05
    )
    adamw = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay),
    )
    if frozen is None:
        return adamw
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: (
            "frozen" if any(frozen == str(getattr(k, "key", k)) for k in path) else "train"
        ),
        state,
    )
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
