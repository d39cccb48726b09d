"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged from the rest.

Paper: S. Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025, arXiv:2412.04467 (section 4).
Official code: github.com/dvlab-research/VisionZip, `visionzip/clip_encoder.py`
(`CLIPVisionTower_VisionZip.forward`) and `visionzip/utils.py` (the attention keys).

Per example, with the tower's hidden state h [L, Dv] at LLaVA's feature layer *including
[CLS] at index 0*, a_j = the [CLS] query's attention to token j at that layer (averaged
over heads; the official sum over heads orders tokens the same way) and the same layer's
keys averaged over heads, k [L, Dh]:
  1. K = dominant + contextual with contextual = floor(K * s + 0.5) capped at K - 1, where
     s is the `contextual_share` option, 10/64 by default (the official configurations
     54+10, 108+20, 162+30 for K = 64, 128, 192; s = 0 keeps dominant tokens only);
  2. dominant tokens: [CLS] and the dominant - 1 patches with the largest a_j (ties ->
     lower index), in ascending token order ([CLS] first);
  3. the M = L - dominant remaining tokens, in ascending order: targets are positions
     0, step, 2 step, ... (step = max(1, M // contextual), the first `contextual` of them);
     every other remaining token joins the target whose key is most cosine-similar
     (ties -> the earlier target); a contextual token is h[target] + the mean of the h of
     the tokens that joined it (h[target] alone when none did);
  4. output: the dominant tokens, then the contextual tokens in target order.
Merged tokens are new tokens, so the method returns K replacement tokens plus the slot
(index into the image's N placeholders) whose position each one takes: a patch keeps its
own slot, [CLS] takes slot 0 (the image's first position) and a contextual token takes
its target's slot. Slots matter only with `keep_positions=True`; by default the K tokens
get contiguous positions in the order above, exactly as the official LLaVA integration.
On LLaVA-NeXT (anyres) it runs on every crop, base view included, with the same K, as
the official LLaVA-NeXT path; the crops' kept tokens are laid out by the family's tower
layout (`models.llava_next.LlavaNextForConditionalGeneration.cls_tower`), which reads each
entry's `Selection.kind` ([CLS] 1, contextual 2, a dominant patch 0) to put the crops' new
tokens after the crop grid's patches, as the official `restore_image_features_sorted`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from zspa_jax.methods._common import HIGHEST, batched, unit
from zspa_jax.methods.base import Method, MethodInputs, Option, Selection

__all__ = ["CONTEXTUAL_SHARE", "METHOD", "split_counts", "visionzip_merge"]

CONTEXTUAL_SHARE = 10 / 64  # official LLaVA-1.5 setting: 54 dominant + 10 contextual of 64
KIND_CLS, KIND_CONTEXTUAL = (
    1,
    2,
)  # Selection.kind of the new tokens (a dominant patch is its own token: 0)


def split_counts(keep: int, contextual_share: float = CONTEXTUAL_SHARE) -> tuple[int, int]:
    """(dominant incl. [CLS], contextual) for K tokens."""
    contextual = min(math.floor(keep * contextual_share + 0.5), keep - 1)
    return keep - contextual, contextual


def _visionzip_one(h, a, k, *, keep: int, cls_in_placeholders: bool, contextual_share: float):
    """h [L, Dv], a [L], k [L, Dh] f32 -> tokens [keep, Dv], slots int32 [keep]."""
    length = h.shape[0]
    dominant, contextual = split_counts(keep, contextual_share)
    n_patch_dom = dominant - 1
    top = (
        lax.top_k(jnp.where(a[1:] == 0.0, 0.0, a[1:]), n_patch_dom)[1] + 1
        if n_patch_dom
        else jnp.zeros((0,), jnp.int32)
    )
    is_dom = jnp.zeros((length,), jnp.bool_).at[0].set(True).at[top].set(True)
    dom_idx = jnp.nonzero(is_dom, size=dominant)[0].astype(jnp.int32)  # ascending, [CLS] first
    tokens = [h[dom_idx]]
    slot_of = (lambda i: i) if cls_in_placeholders else (lambda i: jnp.maximum(i - 1, 0))
    slots = [slot_of(dom_idx)]
    if contextual:
        m = length - dominant
        rest = jnp.nonzero(~is_dom, size=m)[0].astype(jnp.int32)  # ascending
        step = max(1, m // contextual)
        targets = list(range(0, m, step))[:contextual]
        others = [p for p in range(m) if p not in set(targets)]
        tgt_idx = rest[jnp.asarray(targets, jnp.int32)]
        contextual_tokens = h[tgt_idx]
        if others:
            oth_idx = rest[jnp.asarray(others, jnp.int32)]
            kn = unit(k)
            sim = jnp.einsum("md,cd->mc", kn[oth_idx], kn[tgt_idx], precision=HIGHEST)
            assign = jax.nn.one_hot(
                jnp.argmax(sim, axis=1), contextual, dtype=jnp.float32
            )  # [M - c, c]
            counts = jnp.maximum(jnp.sum(assign, axis=0), 1.0)
            merged = (
                jnp.einsum("mc,md->cd", assign, h[oth_idx], precision=HIGHEST) / counts[:, None]
            )
            contextual_tokens = contextual_tokens + merged
        tokens.append(contextual_tokens)
        slots.append(slot_of(tgt_idx))
    return jnp.concatenate(tokens, axis=0), jnp.concatenate(slots).astype(jnp.int32)


@partial(jax.jit, static_argnames=("keep", "cls_in_placeholders", "contextual_share", "batching"))
def visionzip_merge(
    hidden: jax.Array,
    cls_attention: jax.Array,
    keys: jax.Array,
    *,
    keep: int,
    cls_in_placeholders: bool = False,
    contextual_share: float = CONTEXTUAL_SHARE,
    batching: str = "vmap",
) -> tuple[jax.Array, jax.Array]:
    """VisionZip tokens: hidden [B, L, Dv] ([CLS] at 0), cls_attention [B, L], keys [B, L, Dh]
    -> (tokens f32 [B, keep, Dv], slots int32 [B, keep]).

    `cls_in_placeholders`: the placeholders hold [CLS] too (LLaVA's "full" strategy), so
    token i takes slot i; otherwise ("default") patch i takes slot i - 1 and [CLS] slot 0.
    """
    one = partial(
        _visionzip_one,
        keep=keep,
        cls_in_placeholders=cls_in_placeholders,
        contextual_share=contextual_share,
    )
    args = (hidden.astype(jnp.float32), cls_attention.astype(jnp.float32), keys.astype(jnp.float32))
    return batched(one, args, batching)


def _select(
    inputs: MethodInputs, *, keep: int, batching: str, contextual_share: float
) -> Selection:
    tower = inputs.tower
    tokens, slots = visionzip_merge(
        tower.hidden,
        tower.probs,
        tower.keys,
        keep=keep,
        cls_in_placeholders=tower.cls_in_placeholders,
        contextual_share=contextual_share,
        batching=batching,
    )
    dominant, contextual = split_counts(keep, contextual_share)
    kind = jnp.asarray(
        [KIND_CLS] + [0] * (dominant - 1) + [KIND_CONTEXTUAL] * contextual, jnp.int32
    )
    return Selection(slots, tokens, jnp.broadcast_to(kind, slots.shape))


def visionzip_flops(
    n: int,
    d: int,
    keep: int,
    text_tokens: int,
    *,
    key_dim: int | None = None,
    contextual_share: float = CONTEXTUAL_SHARE,
    **_,
) -> int:
    """d = the tower width C, key_dim = its head width Dh: unit keys of the L = N + 1 tower
    tokens, the cosine of the M - c merged tokens to the c targets, then the one-hot
    assignment matrix times their hidden states."""
    if keep >= n:
        return 0
    dh = d if key_dim is None else key_dim
    length = n + 1
    dominant, contextual = split_counts(keep, contextual_share)
    merged = length - dominant - contextual
    if contextual == 0 or merged <= 0:
        return 0
    return 3 * length * dh + 2 * merged * contextual * (dh + d)


METHOD = Method(
    name="visionzip",
    stage="tower",
    select=_select,
    flops=visionzip_flops,
    summary="[CLS] and the patches with the most [CLS] attention, plus contextual tokens merged by key similarity",
    citation="arXiv:2412.04467, github.com/dvlab-research/VisionZip",
    accepts_mask=False,
    merges=True,
    options=(
        Option(
            name="contextual_share",
            type=float,
            default=CONTEXTUAL_SHARE,
            minimum=0.0,
            maximum=1.0,
            help="the share of K made of contextual (merged) tokens, rounded, at most K - 1; "
            "the rest are dominant tokens",
            official="10/64 = 0.15625: dominant=54, contextual=10 of 64 in the official LLaVA "
            "setting (github.com/dvlab-research/VisionZip README; 108+20, 162+30 for 128, 192)",
        ),
    ),
)
