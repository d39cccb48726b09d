"""LLaVA: CLIP tower -> MLP projector -> LLaMA decoder, in Flax NNX.

Pieces are exposed separately (`image_features`, `embed_tokens`, `merge_image_features`,
the decoder with its cache) so that pruning and generation can be composed outside.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import clip, llama
from models.clip import CLIPVisionConfig, CLIPVisionModel
from models.layers import (
    ACTIVATIONS,
    activation,
    check_choice,
    dtype_of,
    merge_image_features,
    padding_causal_mask,
    placeholder_slots,
    positions_from_mask,
    prefixed_rules,
)
from models.llama import LlamaConfig, LlamaForCausalLM
from models.protocol import ClsTower, MultimodalInputs, TowerFeatures

SELECT_STRATEGIES = ("default", "full")


def check_llava_fields(cfg) -> None:
    """Validate (and normalise) the fields LLaVA-style configs share: vision_feature_layer
    (int or list, within the tower), the select strategy, the projector activation and the
    image token id. Messages name the config class and the field."""
    name = type(cfg).__name__
    if isinstance(cfg.vision_feature_layer, (list, tuple)):
        object.__setattr__(
            cfg, "vision_feature_layer", tuple(int(i) for i in cfg.vision_feature_layer)
        )
        if not cfg.vision_feature_layer:
            raise ValueError(f"{name}.vision_feature_layer must not be an empty list")
    n_states = cfg.vision.num_hidden_layers + 1
    for layer in cfg.feature_layers:
        if not -n_states <= layer < n_states:
            raise ValueError(
                f"{name}.vision_feature_layer {layer} is out of range for a tower with "
                f"{n_states} hidden states (valid: {-n_states}..{n_states - 1})"
            )
    check_choice(
        name,
        "vision_feature_select_strategy",
        cfg.vision_feature_select_strategy,
        SELECT_STRATEGIES,
    )
    check_choice(name, "projector_hidden_act", cfg.projector_hidden_act, ACTIVATIONS)
    if not 0 <= cfg.image_token_index:
        raise ValueError(f"{name}.image_token_index must be >= 0, got {cfg.image_token_index}")


class LlavaFields:
    """What LLaVA-style configs derive from their shared fields (image_token_index,
    vision_feature_layer)."""

    @property
    def image_token_id(self) -> int:
        """The placeholder id, under the name every family uses."""
        return self.image_token_index

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return layer if isinstance(layer, tuple) else (layer,)


@dataclasses.dataclass(frozen=True)
class LlavaConfig(LlavaFields):
    vision: CLIPVisionConfig
    text: LlamaConfig
    image_token_index: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self):
        check_llava_fields(self)

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of an image's visual tokens, or None when [CLS] is among them ("full")."""
        side = self.vision.image_size // self.vision.patch_size
        return (side, side) if self.vision_feature_select_strategy == "default" else None

    @property
    def image_seq_length(self) -> int:
        """Visual tokens per image (N): patches, plus CLS under the "full" strategy."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["vision_feature_layer"] = (
            list(self.vision_feature_layer)
            if isinstance(self.vision_feature_layer, tuple)
            else self.vision_feature_layer
        )
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LlavaConfig:
        d = dict(d)
        return cls(
            vision=CLIPVisionConfig(**d.pop("vision")), text=LlamaConfig(**d.pop("text")), **d
        )


class LlavaMultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.text.dtype)
        din = cfg.vision.hidden_size * len(cfg.feature_layers)
        dout = cfg.text.hidden_size
        bias = cfg.multimodal_projector_bias
        self.act = activation(cfg.projector_hidden_act)
        self.linear_1 = nnx.Linear(din, dout, use_bias=bias, dtype=dt, param_dtype=dt, rngs=rngs)
        self.linear_2 = nnx.Linear(dout, dout, use_bias=bias, dtype=dt, param_dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nnx.Module):
    # Parameter shardings over a ("data", "model") mesh: the tower's and the decoder's
    # tables, and the projector split like an MLP (column then row).
    SHARDING_RULES = (
        prefixed_rules("vision_tower", clip.SHARDING_RULES)
        + (
            (r"multi_modal_projector\.linear_1\.kernel", (None, "model")),
            (r"multi_modal_projector\.linear_1\.bias", ("model",)),
            (r"multi_modal_projector\.linear_2\.kernel", ("model", None)),
        )
        + prefixed_rules("language_model", llama.SHARDING_RULES)
    )

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_tower = CLIPVisionModel(cfg.vision, rngs=rngs)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg, rngs=rngs)
        self.language_model = LlamaForCausalLM(cfg.text, rngs=rngs)

    def selected_vision_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B_img, C, H, W] -> tower features fed to the projector [B_img, N, D_vision * n_layers]."""
        n_states = self.config.vision.num_hidden_layers + 1
        wanted = [layer % n_states for layer in self.config.feature_layers]
        states = self.vision_tower.hidden_states(pixel_values, num_layers=max(wanted))
        picked = [states[i] for i in wanted]
        if self.config.vision_feature_select_strategy == "default":
            picked = [s[:, 1:] for s in picked]  # drop CLS
        return jnp.concatenate(picked, axis=-1) if len(picked) > 1 else picked[0]

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected visual tokens in the LLM embedding space: [B_img, N, D_text]."""
        return self.multi_modal_projector(self.selected_vision_features(pixel_values))

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Text embeddings [B, L, D]; placeholder ids (possibly >= vocab) embed as token 0."""
        safe_ids = jnp.where(input_ids == self.config.image_token_index, 0, input_ids)
        return self.language_model.embed(safe_ids)

    def inputs_embeds(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        return merge_image_features(
            input_ids, embeds, self.image_features(pixel_values), self.config.image_token_index
        )

    def multimodal_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array,
        aux=None,
    ) -> MultimodalInputs:
        """The family protocol (models.protocol): 1-D positions from the mask; with images,
        pixel_values [M, C, H, W]. When M = B * I, the visual layout is rows of I images of
        P tokens each (the host adapter lays pruned batches out so: a row with fewer images
        gets blank images whose placeholders are masked)."""
        text = self.embed_tokens(input_ids)
        positions = positions_from_mask(attention_mask)
        if pixel_values is None:
            return MultimodalInputs(text, text, positions, None, None, None)
        features = self.image_features(pixel_values)  # [M, P, D]
        merged = merge_image_features(input_ids, text, features, self.config.image_token_index)
        (m, p, d), b = features.shape, input_ids.shape[0]
        if m % b:
            return MultimodalInputs(merged, text, positions, None, None, None)
        images = m // b
        slots = placeholder_slots(input_ids, self.config.image_token_index, images * p)
        valid = jnp.take_along_axis(attention_mask, slots, axis=1) != 0
        image_index = jnp.broadcast_to(
            jnp.arange(images * p, dtype=jnp.int32).reshape(images, p), (b, images, p)
        )
        grid = self.config.token_grid
        grid = (
            None if grid is None else jnp.broadcast_to(jnp.asarray(grid, jnp.int32), (b, images, 2))
        )
        return MultimodalInputs(
            merged,
            text,
            positions,
            None,
            features.reshape(b, images * p, d),
            valid,
            image_index,
            grid,
        )

    def cls_feature_index(self) -> int:
        """The tower hidden state whose [CLS] attention `cls_tower` reads (models.protocol)."""
        return cls_feature_state(self.config, self.vision_tower)

    def cls_tower(self, pixel_values: jax.Array, aux=None) -> TowerFeatures:
        """The tower at the feature layer with its [CLS] attention row (models.protocol);
        pixel_values [M, C, H, W], one row of features per image (the trivial layout: `aux`
        is unused)."""
        index = self.cls_feature_index()
        states, cls = self.vision_tower.hidden_states(
            pixel_values, num_layers=index, cls_attention_layer=index - 1
        )
        hidden = states[index]  # [B, 1 + P, Dv], [CLS] at 0
        full = self.config.vision_feature_select_strategy == "full"
        features, attention = (hidden, cls.probs) if full else (hidden[:, 1:], cls.probs[:, 1:])
        return TowerFeatures(features, attention, ClsTower(hidden, cls.probs, cls.keys, full))

    def project_tower_features(self, x: jax.Array) -> jax.Array:
        """Tower features [..., Dv] -> the LLM embedding space [..., D]."""
        return self.multi_modal_projector(x)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Full forward (no cache): f32 logits [B, L, V]. Positions follow the mask (left padding)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        embeds = self.inputs_embeds(input_ids, pixel_values)
        hidden, _ = self.language_model.model(
            embeds, positions_from_mask(attention_mask), padding_causal_mask(attention_mask)
        )
        return self.language_model.logits(hidden)


def cls_feature_state(cfg: LlavaConfig, tower) -> int:
    """The hidden-state index whose [CLS] attention the tower's features come with: the one
    feature layer, produced by an attention layer; a ValueError saying why not otherwise."""
    if not getattr(tower, "has_cls_token", False):
        raise ValueError(f"this tower ({type(tower).__name__}) has no [CLS] token")
    layers = cfg.feature_layers
    if len(layers) != 1:
        raise ValueError(
            f"this model concatenates several feature layers {layers}, so no one layer's [CLS] "
            "attention goes with its features"
        )
    index = layers[0] % (cfg.vision.num_hidden_layers + 1)
    if index == 0:
        raise ValueError(
            "vision_feature_layer selects the embeddings (hidden state 0), which no attention "
            "layer produced"
        )
    return index
