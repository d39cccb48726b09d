"""HF LLaVA tensor names -> our parameter paths, as a table of (pattern, target, transform).

Three layouts of the same weights exist (transformers' in-memory names, what
transformers 5 writes, and the legacy hub layout); `canonical_key` folds them into the
one our NNX tree mirrors, then `RULES` renames the leaf and says how to reshape it.
"""

from __future__ import annotations

import enum
import re

import numpy as np


class Transform(enum.Enum):
    IDENTITY = "identity"
    LINEAR = "linear"  # torch [out, in] -> flax kernel [in, out]
    CONV = "conv"  # torch OIHW -> flax HWIO
    CONV_AS_LINEAR = "conv_as_linear"  # torch Conv3d [O, C, T, P, P] with stride == kernel -> kernel [C*T*P*P, O]

    def write_rows(self, out: np.ndarray, start: int, rows: np.ndarray) -> None:
        """Write source rows [start, start + len(rows)) (first torch axis) into `out`, the
        whole target array, casting to its dtype: lets a tensor be converted block by block."""
        stop = start + (rows.shape[0] if rows.ndim else 1)
        if rows.ndim == 0:
            out[...] = rows
        elif self is Transform.LINEAR and rows.ndim == 2:
            out[:, start:stop] = rows.T
        elif self is Transform.CONV and rows.ndim == 4:
            out[..., start:stop] = rows.transpose(2, 3, 1, 0)
        elif self is Transform.CONV_AS_LINEAR and rows.ndim >= 2:
            out[:, start:stop] = rows.reshape(rows.shape[0], -1).T
        else:
            out[start:stop] = rows

    def target_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self is Transform.LINEAR and len(shape) == 2:
            return shape[::-1]
        if self is Transform.CONV and len(shape) == 4:
            return (shape[2], shape[3], shape[1], shape[0])
        if self is Transform.CONV_AS_LINEAR and len(shape) >= 2:
            return (int(np.prod(shape[1:])), shape[0])
        return shape


# (source prefix pattern, canonical prefix): first match wins.
LAYOUTS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^model\.vision_tower\.(?:vision_model\.)?", "vision_tower."),  # in-memory
        (r"^vision_tower\.vision_model\.", "vision_tower."),  # legacy hub
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
    )
)

_LINEARS = r"(?:q_proj|k_proj|v_proj|out_proj|o_proj|fc1|fc2|gate_proj|up_proj|down_proj|linear_1|linear_2|lm_head)"
_NORMS = r"(?:pre_layrnorm|post_layernorm|layer_norm1|layer_norm2|input_layernorm|post_attention_layernorm|norm)"

RULES: tuple[tuple[re.Pattern, str, Transform], ...] = tuple(
    (re.compile(p), r, t)
    for p, r, t in (
        (rf"^(.*\.{_LINEARS})\.weight$", r"\1.kernel", Transform.LINEAR),
        (rf"^(.*\.{_LINEARS})\.bias$", r"\1.bias", Transform.IDENTITY),
        (r"^(.*\.patch_embedding)\.weight$", r"\1.kernel", Transform.CONV),
        (
            r"^(.*\.(?:position_embedding|embed_tokens))\.weight$",
            r"\1.embedding",
            Transform.IDENTITY,
        ),
        (rf"^(.*\.{_NORMS})\.weight$", r"\1.scale", Transform.IDENTITY),
        (rf"^(.*\.{_NORMS})\.bias$", r"\1.bias", Transform.IDENTITY),
        (r"^(.*\.class_embedding)$", r"\1", Transform.IDENTITY),
    )
)

# Buffers some checkpoints carry that are recomputed, never learned.
SKIPPED = re.compile(r"(?:\.position_ids|\.rotary_emb\.inv_freq)$")


def canonical_key(key: str) -> str:
    for pattern, prefix in LAYOUTS:
        if pattern.search(key):
            return pattern.sub(prefix, key, count=1)
    return key


def map_key(key: str) -> tuple[str, Transform] | None:
    """Our dotted parameter path and transform for a HF key, or None if no rule matches."""
    canon = canonical_key(key)
    for pattern, replacement, transform in RULES:
        if pattern.match(canon):
            return pattern.sub(replacement, canon), transform
    return None


KeyRules = tuple[tuple[re.Pattern, str, Transform], ...]
Layouts = tuple[tuple[re.Pattern, str], ...]


def compile_layouts(pairs) -> Layouts:
    return tuple((re.compile(p), r) for p, r in pairs)


def compile_rules(triples) -> KeyRules:
    return tuple((re.compile(p), r, t) for p, r, t in triples)


def table_mapper(layouts: Layouts, rules: KeyRules):
    """A `map_key` for another family's tables: first matching layout prefix, then first rule."""

    def mapper(key: str) -> tuple[str, Transform] | None:
        canon = key
        for pattern, prefix in layouts:
            if pattern.search(key):
                canon = pattern.sub(prefix, key, count=1)
                break
        for pattern, replacement, transform in rules:
            if pattern.match(canon):
                return pattern.sub(replacement, canon), transform
        return None

    return mapper
