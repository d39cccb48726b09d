"""LLaVA-NeXT (LLaVA-1.6, "anyres"): CLIP tower -> MLP projector -> LLaMA decoder, in Flax NNX.

The tower, projector and decoder are LLaVA-1.5's (models/llava.py); what is new is how an
image becomes visual tokens. The processor resizes the image into the best-fitting
resolution of `image_grid_pinpoints`, cuts it into crops of the tower's input size and
prepends a resized base view: pixel_values [num_images, num_patches, C, S, S] (zero crops
pad the batch), with image_sizes [num_images, 2] the original (height, width). Every crop
goes through the tower and the projector; transformers' `pack_image_features` then lays
the crop features out as one feature map, cuts away the rows or columns that only cover
the letterbox padding (back to the original aspect ratio), appends `image_newline` after
every row and puts the base view's tokens first.

How many tokens that gives depends on the image sizes, which are host values. So the
geometry is computed on the host in numpy (zspa_jax.families.llava_next.layout's
`anyres_layout`: per image, for every output slot, the index of the tower token it takes,
-1 for a newline slot, plus a validity mask for the padding that gives all images one
static length: the `AnyresLayout` below), and the jitted part (`packed_features`) is one
gather over static-shaped arrays: images of different sizes share one compiled function.

Reference: transformers' models/llava_next (modeling, processing, image processing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import clip, llama
from models.clip import CLIPVisionConfig, CLIPVisionModel
from models.layers import (
    dtype_of,
    padding_causal_mask,
    positions_from_mask,
    prefixed_rules,
)
from models.llama import LlamaConfig, LlamaForCausalLM
from models.llava import (
    LlavaFields,
    LlavaMultiModalProjector,
    check_llava_fields,
    cls_feature_state,
)
from models.protocol import ClsTower, MultimodalInputs, TowerFeatures, TowerLayout

# transformers' LlavaNextConfig default (llava-v1.6 at 336 px)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# Only "default" (drop [CLS]): under "full", transformers cannot lay a CLIP tower's
# 1 + P tokens per crop out as the crop grid (pack_image_features raises).
SELECT_STRATEGIES = ("default",)
NEWLINE = -1  # layout index of an image_newline slot (and of padding slots)


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaFields):
    vision: CLIPVisionConfig
    text: LlamaConfig
    image_token_index: int = 32000
    # (height, width) in pixels
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self):
        name = type(self).__name__
        if self.vision_feature_select_strategy == "full":
            raise ValueError(
                f"{name}.vision_feature_select_strategy='full' is not supported for LLaVA-NeXT: the CLIP tower's "
                "[CLS] token cannot be laid out in the crop grid (transformers' pack_image_features fails too); "
                "expected 'default'"
            )
        check_llava_fields(self)
        object.__setattr__(
            self,
            "image_grid_pinpoints",
            _check_pinpoints(name, self.image_grid_pinpoints, self.vision),
        )

    @property
    def crop_size(self) -> int:
        """Side of one crop (and of the base view) in pixels: the tower's input size S."""
        return self.vision.image_size

    @property
    def tokens_per_side(self) -> int:
        """Visual tokens along one side of a crop: S / patch_size."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def tokens_per_crop(self) -> int:
        """Visual tokens of one crop (and of the base view) after dropping [CLS]: P."""
        return self.vision.num_patches

    @property
    def max_patches(self) -> int:
        """Most crops an image can need (base view included): pixel_values' second axis at most."""
        return 1 + max(h * w for h, w in self.image_grid_pinpoints) // self.crop_size**2

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        layer = self.vision_feature_layer
        out["vision_feature_layer"] = list(layer) if isinstance(layer, tuple) else layer
        out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LlavaNextConfig:
        d = dict(d)
        return cls(
            vision=CLIPVisionConfig(**d.pop("vision")), text=LlamaConfig(**d.pop("text")), **d
        )


def _check_pinpoints(
    owner: str, pinpoints: Any, vision: CLIPVisionConfig
) -> tuple[tuple[int, int], ...]:
    """(height, width) pairs, each a positive multiple of the tower's input size."""
    try:
        pairs = tuple((int(h), int(w)) for h, w in pinpoints)
        exact = all(float(h) == hh and float(w) == ww for (h, w), (hh, ww) in zip(pinpoints, pairs))
    except (TypeError, ValueError):
        exact, pairs = False, ()
    if not pairs or not exact:
        raise ValueError(
            f"{owner}.image_grid_pinpoints must be a non-empty list of [height, width] ints, got {pinpoints!r}"
        )
    side = vision.image_size
    bad = [list(p) for p in pairs if min(p) < 1 or p[0] % side or p[1] % side]
    if bad:
        raise ValueError(
            f"{owner}.image_grid_pinpoints {bad} are not positive multiples of the vision tower's image_size ({side}); "
            "every resolution must split into whole crops"
        )
    return pairs


# ----------------------------------------------------------------------------- the aux pytree


class AnyresLayout(NamedTuple):
    """Where each image's packed visual tokens come from (host-computed; a pytree of arrays).

    Slot s of image m takes tower token `index[m, s]` of that image (crop * P + token, crop
    0 the base view), or `image_newline` where index is NEWLINE (-1) and the slot is valid.
    Slots past an image's token count are padding (`valid` False) so images of different
    sizes share one static length S; their features are zero.

    With input_ids (`anyres_layout(..., input_ids=)`), also the batch's visual layout
    (models.protocol): row b's N placeholder slots in sequence order, and its images.
    """

    index: np.ndarray  # int32 [M, S]
    valid: np.ndarray  # bool [M, S]
    # int32 [B, N]: packed slot m * S + s of row b's n-th placeholder, -1 none
    row_index: np.ndarray | None = None
    # int32 [B, I, S]: row slot of each token of row b's i-th image, -1 padding
    image_index: np.ndarray | None = None
    # The tower layout of models.protocol for the tower-stage methods (with input_ids): per
    # image, crop (base view first, max_patches of them) and tower token
    # int32 [M, C, P]: the row slot whose position the token takes, -1: no crop
    tower_slot: np.ndarray | None = None
    # int32 [M, C, P]: raster index in the crop grid's full (padded) map
    tower_order: np.ndarray | None = None
    # int32 [M, C]: row slot of the base view's / the crop grid's first token
    tower_start: np.ndarray | None = None


# ----------------------------------------------------------------------------- model


class LlavaNextForConditionalGeneration(nnx.Module):
    # LLaVA-1.5's table (tower, projector split like an MLP, decoder); image_newline [D]
    # is replicated.
    SHARDING_RULES = (
        prefixed_rules("vision_tower", clip.SHARDING_RULES)
        + (
            (r"multi_modal_projector\.linear_1\.kernel", (None, "model")),
            (r"multi_modal_projector\.linear_1\.bias", ("model",)),
            (r"multi_modal_projector\.linear_2\.kernel", ("model", None)),
            (r"image_newline", (None,)),
        )
        + prefixed_rules("language_model", llama.SHARDING_RULES)
    )

    def __init__(self, cfg: LlavaNextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt = dtype_of(cfg.text.dtype)
        self.vision_tower = CLIPVisionModel(cfg.vision, rngs=rngs)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg, rngs=rngs)
        std = cfg.text.hidden_size**-0.5  # transformers' init (overwritten by a checkpoint)
        self.image_newline = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.text.hidden_size,), dt) * std
        )
        self.language_model = LlamaForCausalLM(cfg.text, rngs=rngs)

    # -- vision -------------------------------------------------------------------------

    def selected_vision_features(self, pixel_values: jax.Array) -> jax.Array:
        """Crops [B, C, S, S] -> tower features at the feature layer(s), [CLS] dropped: [B, P, Dv * n_layers]."""
        n_states = self.config.vision.num_hidden_layers + 1
        wanted = [layer % n_states for layer in self.config.feature_layers]
        states = self.vision_tower.hidden_states(pixel_values, num_layers=max(wanted))
        picked = [states[i][:, 1:] for i in wanted]
        return jnp.concatenate(picked, axis=-1) if len(picked) > 1 else picked[0]

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Crops [B, C, S, S] -> projected tokens [B, P, D] (one crop per row, before packing)."""
        return self.multi_modal_projector(self.selected_vision_features(pixel_values))

    def _check_crops(self, pixel_values: jax.Array) -> tuple[int, int, int]:
        """One crop's shape (C, S, S), after checking that pixel_values is [num_images,
        num_patches, C, S, S] crops of the tower's size."""
        vc = self.config.vision
        crop = (vc.num_channels, vc.image_size, vc.image_size)
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != crop:
            raise ValueError(
                f"pixel_values must be [num_images, num_patches, {', '.join(map(str, crop))}], got "
                f"{tuple(pixel_values.shape)}"
            )
        return crop

    def packed_features(self, pixel_values: jax.Array, layout: AnyresLayout) -> jax.Array:
        """pixel_values [num_images, num_patches, C, S, S] -> each image's packed visual
        tokens [num_images, num_slots, D] (base view, then the unpadded crop grid with a
        newline after each row; padding slots zero), as `layout` (`anyres_layout`) says.

        Every crop row goes through the tower, the zero crops that pad a batch too: their
        tokens are never gathered. Shapes are static, so this jits once per
        (num_images, num_patches, num_slots)."""
        crop = self._check_crops(pixel_values)
        n, k = pixel_values.shape[:2]
        index, valid = layout.index, layout.valid
        if tuple(index.shape) != tuple(valid.shape) or index.ndim != 2 or index.shape[0] != n:
            raise ValueError(
                f"layout (index {tuple(index.shape)}, valid {tuple(valid.shape)}) must have one row per image of "
                f"pixel_values ({n})"
            )
        if (
            isinstance(index, np.ndarray)
            and index.size
            and int(index.max()) >= k * self.config.tokens_per_crop
        ):
            raise ValueError(
                f"layout reads crop {int(index.max()) // self.config.tokens_per_crop} but pixel_values has {k} crops "
                "per image; image_sizes does not match pixel_values"
            )
        tokens = self.image_features(pixel_values.reshape(n * k, *crop))  # [n * k, P, D]
        tokens = tokens.reshape(n, -1, tokens.shape[-1])  # [n, k * P, D]
        index = jnp.asarray(index, jnp.int32)
        valid = jnp.asarray(valid, bool)
        gathered = jnp.take_along_axis(tokens, jnp.maximum(index, 0)[..., None], axis=1)
        newline = self.image_newline[...].astype(tokens.dtype)
        out = jnp.where((index == NEWLINE)[..., None], newline, gathered)
        return jnp.where(valid[..., None], out, jnp.zeros((), tokens.dtype))

    # -- text + merge --------------------------------------------------------------------

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Text embeddings [B, L, D]; placeholder ids (possibly >= vocab) embed as token 0."""
        safe_ids = jnp.where(input_ids == self.config.image_token_index, 0, input_ids)
        return self.language_model.embed(safe_ids)

    def merge_packed(
        self,
        input_ids: jax.Array,
        embeds: jax.Array,
        packed: jax.Array,
        valid: jax.Array,
        attention_mask=None,
    ) -> jax.Array:
        """Write the images' valid packed tokens, image after image, into the real
        placeholder positions (attention_mask != 0) in reading order across the batch
        (transformers' masked_scatter order); masked placeholders keep their embedding.

        packed [M, S, D] with valid [M, S] a prefix of each row (as `anyres_layout` makes
        it); the real placeholder count must equal valid.sum() (checked on the host by
        `check_inputs` / `anyres_layout(..., input_ids=)`)."""
        is_image = input_ids == self.config.image_token_index
        if attention_mask is not None:
            is_image &= attention_mask != 0
        lengths = jnp.sum(jnp.asarray(valid, jnp.int32), axis=1)  # [M]
        ends = jnp.cumsum(lengths)
        order = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(
            is_image.shape
        )  # placeholder ordinal
        image = jnp.clip(jnp.searchsorted(ends, order, side="right"), 0, packed.shape[0] - 1)
        slot = jnp.clip(order - (ends - lengths)[image], 0, packed.shape[1] - 1)
        features = packed[image, slot].astype(embeds.dtype)
        return jnp.where(is_image[..., None], features, embeds)

    def inputs_embeds(
        self, input_ids: jax.Array, pixel_values: jax.Array | None, layout: AnyresLayout | None
    ) -> jax.Array:
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        if layout is None:
            raise ValueError(
                "aux must be the AnyresLayout of the images (anyres_layout(image_sizes, config)) when "
                "pixel_values is given"
            )
        return self.merge_packed(
            input_ids, embeds, self.packed_features(pixel_values, layout), layout.valid
        )

    def multimodal_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None,
        aux=None,
    ) -> MultimodalInputs:
        """The family protocol (models.protocol): 1-D positions from the mask; with images,
        `aux` is their AnyresLayout. When it carries the batch's visual layout
        (`anyres_layout(..., input_ids=)`), `visual` [B, N, D] holds each row's placeholder
        tokens in sequence order, `visual_valid` its real ones and `image_index` each image's
        slots; otherwise those are None. An image's tokens are no single grid (base view,
        then an unpadded grid with newlines), so `image_grid` is None."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        text = self.embed_tokens(input_ids)
        positions = positions_from_mask(attention_mask)
        if pixel_values is None:
            return MultimodalInputs(text, text, positions, None, None, None)
        if aux is None:
            raise ValueError(
                "aux must be the AnyresLayout of the images (anyres_layout(image_sizes, config)) when "
                "pixel_values is given"
            )
        packed = self.packed_features(pixel_values, aux)  # [M, S, D]
        merged = self.merge_packed(input_ids, text, packed, aux.valid, attention_mask)
        visual = valid = image_index = None
        if aux.row_index is not None:
            row_index = jnp.asarray(aux.row_index, jnp.int32)
            valid = row_index >= 0
            visual = packed.reshape(-1, packed.shape[-1])[jnp.maximum(row_index, 0)]
            visual = jnp.where(valid[..., None], visual, jnp.zeros((), visual.dtype))
            image_index = jnp.asarray(aux.image_index, jnp.int32)
        return MultimodalInputs(
            embeds=merged,
            text_embeds=text,
            positions=positions,
            next_position=None,
            visual=visual,
            visual_valid=valid,
            image_index=image_index,
        )

    def cls_feature_index(self) -> int:
        """The tower hidden state whose [CLS] attention `cls_tower` reads (models.protocol)."""
        return cls_feature_state(self.config, self.vision_tower)

    def cls_tower(self, pixel_values: jax.Array, aux: AnyresLayout | None = None) -> TowerFeatures:
        """The tower at the feature layer with its [CLS] attention row (models.protocol), for
        the tower-stage methods: one tower row per crop, pixel_values [M, C, ...] -> M * C
        rows of P tokens (base view, then the crop grid, per image), and their layout from
        `aux` (`anyres_layout(..., input_ids=)`).

        The layout is the official LLaVA-NeXT code's (VisPruner's and VisionZip's anyres
        paths): each crop keeps K of its own tokens by its own [CLS] attention; the base
        view's kept tokens come first, in the method's order; then the crop grid's kept
        tokens in raster order over the whole crop grid, with neither unpadding nor newline
        tokens (a kept token that unpadding would cut away stays, at its nearest kept
        token's position), then the crops' new tokens (VisionZip: [CLS] of each crop, then
        each crop's contextual tokens)."""
        crop = self._check_crops(pixel_values)
        if aux is None or aux.tower_slot is None:
            raise ValueError(
                "cls_tower needs aux: the AnyresLayout of the batch "
                "(anyres_layout(image_sizes, config, input_ids=...))"
            )
        index = self.cls_feature_index()
        n, k = pixel_values.shape[:2]
        states, cls = self.vision_tower.hidden_states(
            pixel_values.reshape(n * k, *crop), num_layers=index, cls_attention_layer=index - 1
        )
        hidden = states[index]  # [n * k, 1 + P, Dv], [CLS] at 0
        slot, order, start = (
            jnp.asarray(x, jnp.int32) for x in (aux.tower_slot, aux.tower_order, aux.tower_start)
        )
        have = slot.shape[1]
        if k > have:  # more crops than any pinpoint needs: the extra ones hold nothing
            slot = jnp.pad(slot, ((0, 0), (0, k - have), (0, 0)), constant_values=-1)
            order = jnp.pad(order, ((0, 0), (0, k - have), (0, 0)))
            start = jnp.pad(start, ((0, 0), (0, k - have)), constant_values=-1)
        slot, order, start = slot[:, :k], order[:, :k], start[:, :k]
        interleave = jnp.broadcast_to(
            jnp.arange(k) >= 1, (n, k)
        )  # the crop grid is one map; the base view its own
        layout = TowerLayout(
            slot.reshape(n * k, -1),
            order.reshape(n * k, -1),
            start.reshape(-1),
            interleave.reshape(-1),
            int(aux.row_index.shape[1]),
        )
        return TowerFeatures(
            hidden[:, 1:], cls.probs[:, 1:], ClsTower(hidden, cls.probs, cls.keys, False), layout
        )

    def project_tower_features(self, x: jax.Array) -> jax.Array:
        """Tower features [..., Dv] -> the LLM embedding space [..., D]."""
        return self.multi_modal_projector(x)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        aux: AnyresLayout | None = None,
    ) -> jax.Array:
        """Full forward (no cache): f32 logits [B, L, V]. Positions follow the mask (left padding)."""
        inputs = self.multimodal_inputs(input_ids, pixel_values, attention_mask, aux)
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
        hidden, _ = self.language_model.model(
            inputs.embeds, inputs.positions, padding_causal_mask(mask)
        )
        return self.language_model.logits(hidden)
