"""Small building blocks shared by the model ports: activations, dtypes, attention masks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Names follow transformers' ACT2FN. HF "gelu" is the exact erf GELU; jax.nn.gelu
# defaults to the tanh approximation, so the flag is always explicit here.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# A sharding rule: (regex matched against a parameter path such as
# "model.layers.0.self_attn.q_proj.kernel", one mesh axis or None per dimension).
# Each model module declares a SHARDING_RULES table; zspa_jax.sharding applies it.
ShardingRule = tuple[str, tuple[str | None, ...]]


def prefixed_rules(prefix: str, rules: tuple[ShardingRule, ...]) -> tuple[ShardingRule, ...]:
    """A component's rules as seen from its parent module (`prefix` is the attribute name)."""
    return tuple((re.escape(prefix + ".") + pattern, axes) for pattern, axes in rules)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


def dtype_of(name: str) -> jnp.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def check_choice(owner: str, field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"{owner}.{field}={value!r} is not supported; expected one of {sorted(choices)}"
        )


def check_positive(owner: str, **fields: int) -> None:
    for field, value in fields.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{field} must be a positive int, got {value!r}")


# Finite "minus infinity": a fully masked row (a left-pad query) then softmaxes to a
# uniform distribution instead of NaN, and never leaks into valid rows.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float | None = None
) -> jax.Array:
    """Softmax attention with grouped KV heads; softmax in f32 like transformers' eager path.

    q: [B, L, H, Dh]; k, v: [B, S, Hkv, Dh] with H % Hkv == 0; mask: bool [B, L, S] or None.
    Returns [B, L, H, Dh] in q's dtype.
    """
    b, seq, h, dh = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    qg = q.reshape(b, seq, hkv, h // hkv, dh)
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k).astype(jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    return out.reshape(b, seq, h, dh)


PROMPT_BLOCK = 128  # query rows per block of `causal_prompt_attention`


def causal_prompt_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = PROMPT_BLOCK
) -> jax.Array:
    """`dot_product_attention` of a prompt over its own keys under a causal mask, by query blocks.

    q: [B, L, H, Dh]; k, v: [B, L, Hkv, Dh]; mask: bool [B, L, L], causal (query i sees no
    key after i) and padding. Block i's queries see no key past the block's end, so it
    scores only keys [0, end): about half the products of the full [L, L] score matrix,
    and each block's scores stay in cache instead of streaming an [H, L, L] array through
    memory several times. Every row with a visible key gets `dot_product_attention`'s result
    (up to summation order: the masked keys it skips weigh exactly 0 there); a row that
    sees no key (a left-padding query, which nothing reads) averages the values of a
    shorter span. Returns [B, L, H, Dh].
    """
    length = q.shape[1]
    if length <= block:
        return dot_product_attention(q, k, v, mask)
    outs = []
    for start in range(0, length, block):  # static: each block its own shapes
        end = min(length, start + block)
        outs.append(
            dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end])
        )
    return jnp.concatenate(outs, axis=1)


def padding_causal_mask(attention_mask: jax.Array) -> jax.Array:
    """bool [B, L, L]: query i sees key j iff j <= i and key j is not padding.

    attention_mask: [B, L], 1 for real tokens, 0 for (left) padding.
    """
    valid = attention_mask.astype(bool)
    length = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None] & valid[:, None, :]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """int32 [B, L] RoPE positions that start at 0 on each row's first real token.

    Matches transformers' generate (cumsum - 1, padding set to 1): a left-padded row then
    gets exactly the positions it would have alone.
    """
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=-1) - 1
    return jnp.where(mask == 1, positions, 1).astype(jnp.int32)


def placeholder_slots(input_ids: jax.Array, token_ids: int | tuple[int, ...], n: int) -> jax.Array:
    """int32 [B, n]: the sequence positions of each row's first `n` placeholders (any id of
    `token_ids`), ascending (every row holds at least n of them)."""
    ids = (token_ids,) if isinstance(token_ids, int) else tuple(token_ids)
    others = (~jnp.isin(input_ids, jnp.asarray(ids, input_ids.dtype))).astype(jnp.int8)
    return jnp.argsort(others, axis=1, stable=True)[:, :n].astype(jnp.int32)


def merge_image_features(
    input_ids: jax.Array,
    inputs_embeds: jax.Array,
    image_features: jax.Array,
    image_token_index: int,
) -> jax.Array:
    """Write visual tokens into the placeholder positions, in reading order across the batch.

    input_ids: int [B, L]; inputs_embeds: [B, L, D]; image_features: [M, N, D] with
    M * N == number of placeholders (checked by the family's host adapter). Same
    order as transformers' masked_scatter; gather-based so shapes stay static under jit.
    """
    is_image = input_ids == image_token_index
    flat = image_features.reshape(-1, image_features.shape[-1]).astype(inputs_embeds.dtype)
    order = jnp.cumsum(is_image.reshape(-1)) - 1
    order = jnp.clip(order, 0, flat.shape[0] - 1).reshape(is_image.shape)
    return jnp.where(is_image[..., None], flat[order], inputs_embeds)
