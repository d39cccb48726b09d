"""Host-side adapters, one per model family, chosen by the family recorded in the checkpoint.

`forward`, `generate` and `generate_tokens` call only `prepare_arrays`, `encode` and
`load_processor` here; each turns user inputs (transformers' names: `pixel_values`,
`image_grid_thw`) into a `HostBatch` whose `aux` pytree the jitted programs hand to the
model's `multimodal_inputs` (models.protocol). Validation happens here, before any
compile, with errors that name the argument.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from models.checkpoint import family_of
from models import qwen2_5_vl as qwen
from zspa_jax.pruning import AUTO, CLS_ATTENTION_METHODS, MASKED_METHODS, PruneConfig
from zspa_jax.sharding import data_size, padded_rows, place, place_tree
from zspa_jax.validation import check_binary_mask, check_finite, check_ids_in_range

WINDOW_BUCKET_MIN = 4  # the tower's window count is padded to a power of two >= this
SPAN_BUCKET = 64  # pruning: each image span is padded to a multiple of this many slots


class HostBatch(NamedTuple):
    input_ids: Any  # int [B, L] (numpy, or the caller's arrays for LLaVA, possibly traced)
    attention_mask: Any  # int [B, L] or None (all real)
    pixel_values: np.ndarray | None
    aux: Any  # the family's pytree for `multimodal_inputs` (None for LLaVA)
    num_visual: int  # visual slots per row N (the pruned span), 0 without images
    min_visual: int  # fewest real visual tokens in a row (what a prune ratio applies to)
    prompt_tokens: np.ndarray | None  # int [B]: real prompt tokens per row before any padding (None if traced)
    visual_per_row: np.ndarray | None = None  # int [B]: real visual tokens per row (None: num_visual each)
    rows: int | None = None  # the caller's rows when the batch was padded for a mesh (None: not padded)


def resolve_prune(prune: PruneConfig | None, batch: HostBatch) -> PruneConfig | None:
    """A keep-count PruneConfig for this batch (ratio applied to the fewest real tokens), or
    None when there is nothing to prune."""
    if prune is None or batch.pixel_values is None:
        return None
    keep = prune.num_keep(batch.min_visual)  # raises when keep exceeds a row's tokens
    return dataclasses.replace(prune, keep=keep, ratio=None)


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _check_ids(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got shape {ids.shape} ({ids.dtype})")
    if attention_mask is None:
        return ids, np.ones(ids.shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
    check_binary_mask("attention_mask", mask)
    if (mask[:, -1] == 0).any():
        raise ValueError("attention_mask must be left-padded: the last position of every row must be a real token")
    return ids, mask.astype(np.int32)


class LlavaAdapter:
    """LLaVA keeps its original host path (`zspa_jax.inputs`): fixed N per image, no aux."""

    def prepare(self, vlm, input_ids, pixel_values, attention_mask, image_grid_thw, prune, extra_length, bucket,
                prompt_bucket=None):
        from zspa_jax.inputs import check_arrays

        if image_grid_thw is not None:
            raise ValueError("image_grid_thw is only used by Qwen2.5-VL models; this checkpoint is a LLaVA")
        arrays = check_arrays(vlm, input_ids, pixel_values, attention_mask, prune, extra_length=extra_length)
        # Traced arrays pass through untouched (generate_tokens is jittable for LLaVA).
        input_ids, pixel_values, attention_mask = arrays.input_ids, arrays.pixel_values, arrays.attention_mask
        n = vlm.config.image_seq_length if pixel_values is not None else 0
        prompt_tokens = None
        if not _is_traced(input_ids, attention_mask):
            ids = np.asarray(input_ids, np.int32)
            mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
            prompt_tokens = mask.sum(axis=1)
            if prompt_bucket:
                input_ids, attention_mask = left_pad(ids, mask, prompt_bucket, vlm.pad_token_id)
        return HostBatch(input_ids, attention_mask, pixel_values, None, n, n, prompt_tokens)

    def last_row_images(self, vlm, ids: np.ndarray, image_grid_thw) -> tuple[int, int]:
        """(images, pixel_values rows) of the batch's last row (images are in reading order)."""
        images = int((ids[-1] == vlm.config.image_token_id).sum()) // vlm.config.image_seq_length
        return images, images

    def encode(self, vlm, prompts, images, chat_template):
        from zspa_jax.inputs import encode

        return encode(vlm, prompts, images, chat_template=chat_template)

    def load_processor(self, path: Path):
        from zspa_jax.loading import load_processor

        return load_processor(path)


def _check_qwen_method(prune: PruneConfig | None) -> None:
    """Qwen2.5-VL rows carry different numbers of visual tokens (a mask over padded slots):
    only the methods whose kernels take that mask apply; the [CLS] methods need a token its
    tower does not have."""
    if prune is None:
        return
    if prune.method in CLS_ATTENTION_METHODS:
        raise ValueError(
            f"method {prune.method!r} needs the vision tower's [CLS] attention; Qwen2.5-VL's tower has no [CLS] token"
        )
    if prune.method not in MASKED_METHODS or prune.core_ratio == AUTO:
        what = f"method {prune.method!r}" + (" with core_ratio='auto'" if prune.core_ratio == AUTO else "")
        raise ValueError(
            f"{what} is not implemented for Qwen2.5-VL (variable-size images); use one of {MASKED_METHODS} "
            "with a fixed core_ratio"
        )


class QwenAdapter:
    """Qwen2.5-VL: grids, window layouts and 3-D positions computed here from
    `image_grid_thw`; tower patches and pruned spans padded to buckets when `bucket`."""

    def prepare(self, vlm, input_ids, pixel_values, attention_mask, image_grid_thw, prune, extra_length, bucket,
                prompt_bucket=None):
        if _is_traced(input_ids, pixel_values, attention_mask, image_grid_thw):
            raise ValueError(
                "Qwen2.5-VL inputs must be concrete arrays: window layouts and 3-D positions are computed "
                "on the host from image_grid_thw"
            )
        _check_qwen_method(prune)
        ids, mask = _check_ids(input_ids, attention_mask)
        cfg = vlm.config
        check_ids_in_range("input_ids", ids, cfg.text.vocab_size)
        if pixel_values is not None:
            pixels = np.asarray(pixel_values)
            if not np.issubdtype(pixels.dtype, np.floating):
                raise TypeError(f"pixel_values must be a float array of flattened patches, got dtype {pixels.dtype}")
            if pixels.size:
                check_finite("pixel_values", pixels, what="patch row")
        pruning = prune is not None and pixel_values is not None
        grid = None if image_grid_thw is None else np.asarray(image_grid_thw)
        span_slots = windows = None
        if bucket and pixel_values is not None and grid is not None and grid.ndim == 2 and grid.shape[-1] == 3:
            qwen.check_grid(grid, cfg.vision)
            needed = qwen.num_windows(grid, cfg.vision)
            windows = max(WINDOW_BUCKET_MIN, 1 << max(needed - 1, 0).bit_length())
            if pruning:
                span_slots = _round_up(int(np.prod(grid, axis=-1).max()) // cfg.vision.merge_unit, SPAN_BUCKET)
        batch = qwen.prepare_batch(
            cfg,
            ids,
            mask,
            pixel_values,
            grid,
            one_image_per_row=pruning,
            span_slots=span_slots,
            windows=windows,
            pad_id=vlm.pad_token_id,
            prompt_multiple=prompt_bucket,
        )
        n = 0 if batch.aux.visual_index is None else batch.aux.visual_index.shape[1]
        per_row = (batch.aux.feature_index >= 0).sum(axis=1)  # real visual tokens per row
        min_visual = int(per_row.min()) if batch.pixel_values is not None else 0
        if pruning:
            prune.num_keep(min_visual)  # keep > the smallest image's tokens: a clear error now
        batch_max = int(batch.aux.next_position.max()) if batch.aux.next_position.size else 0
        length = batch.input_ids.shape[1] - (n - prune.num_keep(min_visual) if pruning else 0)
        max_pos = cfg.text.max_position_embeddings
        if max(batch_max, length) + extra_length > max_pos:
            raise ValueError(
                f"the prompt (positions up to {batch_max}) plus max_new_tokens ({extra_length}) needs "
                f"{max(batch_max, length) + extra_length} positions; the model allows at most {max_pos}"
            )
        return HostBatch(
            batch.input_ids, batch.attention_mask, batch.pixel_values, batch.aux, n, min_visual, mask.sum(1),
            per_row if batch.pixel_values is not None else None,
        )

    def last_row_images(self, vlm, ids: np.ndarray, image_grid_thw) -> tuple[int, int]:
        """(images, patch rows) of the batch's last row: its placeholders, matched against
        the last images' t*h*w / merge^2 tokens."""
        tokens = int((ids[-1] == vlm.config.image_token_id).sum())
        grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
        images = patches = 0
        while tokens > 0 and images < len(grid):
            images += 1
            size = int(np.prod(grid[-images]))
            patches += size
            tokens -= size // vlm.config.vision.merge_unit
        return images, patches

    def encode(self, vlm, prompts, images, chat_template):
        if vlm.processor is None:
            raise ValueError(f"{vlm.path} has no saved tokenizer/image processor, so give input_ids and pixel_values")
        return vlm.processor.encode(prompts, images, chat_template)

    def load_processor(self, path: Path):
        return QwenProcessor.load(path)


def left_pad(ids: np.ndarray, mask: np.ndarray, multiple: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad [B, L] ids (pad_id) and mask (0) to a multiple of `multiple` (fewer compiles)."""
    extra = _round_up(ids.shape[1], multiple) - ids.shape[1]
    if not extra:
        return ids, mask
    return np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0)))


def _is_traced(*arrays) -> bool:
    import jax

    return any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


@dataclasses.dataclass
class QwenProcessor:
    """Tokenizer + Qwen2-VL image processor, doing what transformers' Qwen2_5_VLProcessor
    does for images: each `<|image_pad|>` becomes t*h*w / merge^2 copies. Built from the
    saved files directly, so it works where transformers cannot construct the full
    processor (its video processor needs torchvision)."""

    tokenizer: Any
    image_processor: Any
    image_token: str = "<|image_pad|>"

    @classmethod
    def load(cls, path: Path) -> "QwenProcessor | None":
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = AutoImageProcessor.from_pretrained(path) if (path / "preprocessor_config.json").exists() else None
        return cls(tokenizer, image_processor)

    @property
    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    def encode(self, prompts, images, chat_template: bool | None = None) -> dict[str, np.ndarray]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None:
            for i, img in enumerate(images):
                if _looks_like_video(img):
                    raise ValueError(f"images[{i}] looks like a video (a list of frames): video input is not supported")
            if len(images) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompt(s) but {len(images)} image(s); give one image per prompt")
        use_template = self.chat_template is not None if chat_template is None else chat_template
        if use_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": ([{"type": "image"}] if images is not None else [])
                      + [{"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p in prompts
            ]
        else:
            texts = prompts
        out: dict[str, np.ndarray] = {}
        if images is not None:
            if self.image_processor is None:
                raise ValueError("this checkpoint has no image processor (preprocessor_config.json missing)")
            try:
                rgb = [im.convert("RGB") if hasattr(im, "convert") else np.asarray(im) for im in images]
                pix = self.image_processor(images=rgb, return_tensors="np")
            except ValueError as e:  # e.g. an aspect ratio the processor refuses
                raise ValueError(f"the image processor refused an image: {e}") from None
            out["pixel_values"] = np.asarray(pix["pixel_values"], np.float32)
            out["image_grid_thw"] = np.asarray(pix["image_grid_thw"], np.int64)
            merge = self.image_processor.merge_size**2
            counts = iter((np.prod(out["image_grid_thw"], axis=-1) // merge).tolist())
            expanded = []
            for i, text in enumerate(texts):
                if text.count(self.image_token) != 1:
                    raise ValueError(
                        f"prompts[{i}] must contain the image token {self.image_token!r} exactly once "
                        f"(found {text.count(self.image_token)})"
                    )
                expanded.append(text.replace(self.image_token, self.image_token * next(counts)))
            texts = expanded
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, return_tensors="np", padding=True)
        out["input_ids"] = np.asarray(enc["input_ids"], np.int32)
        out["attention_mask"] = np.asarray(enc["attention_mask"], np.int32)
        return out

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _looks_like_video(x) -> bool:
    if isinstance(x, (list, tuple)):
        return True
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) == 4


ADAPTERS = {"llava": LlavaAdapter(), "qwen2_5_vl": QwenAdapter()}


def adapter(vlm_or_config):
    cfg = getattr(vlm_or_config, "config", vlm_or_config)
    return ADAPTERS[family_of(cfg).name]


def prepare_arrays(
    vlm,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    image_grid_thw=None,
    prune=None,
    extra_length=0,
    bucket=False,
    prompt_bucket: int | None = None,
) -> HostBatch:
    """Validate arrays (before any compile) and build the family's host batch.

    `bucket`: pad the family's image-dependent shapes to buckets (Qwen2.5-VL: the tower's
    window count and, when pruning, each image span), so images of different sizes share
    compiled programs. `prompt_bucket`: left-pad the prompt to a multiple of this.
    """
    family = adapter(vlm)
    batch = family.prepare(
        vlm, input_ids, pixel_values, attention_mask, image_grid_thw, prune, extra_length, bucket, prompt_bucket
    )
    rows = int(np.shape(batch.input_ids)[0])
    target = padded_rows(rows, vlm.mesh)
    if target == rows:
        return batch
    if _is_traced(input_ids, pixel_values, attention_mask, image_grid_thw):
        raise ValueError(
            f"a batch of {rows} rows does not divide the mesh axis 'data' ({data_size(vlm.mesh)}) and traced "
            "arrays cannot be padded: pass a multiple of it, or concrete arrays"
        )
    # Validated above: pad with copies of the last row (and its images), run again.
    ids, pixels, mask, grid = _repeat_last_row(family, vlm, input_ids, pixel_values, attention_mask, image_grid_thw,
                                               target - rows)
    batch = family.prepare(vlm, ids, pixels, mask, grid, prune, extra_length, bucket, prompt_bucket)
    return batch._replace(rows=rows)


def _repeat_last_row(family, vlm, input_ids, pixel_values, attention_mask, image_grid_thw, extra: int):
    """The batch with its last row (and that row's images) appended `extra` more times."""
    ids = np.asarray(input_ids)
    mask = None if attention_mask is None else np.asarray(attention_mask)
    images, pixel_rows = family.last_row_images(vlm, ids, image_grid_thw)
    repeat = lambda x, n: np.concatenate([x] + [x[len(x) - n:]] * extra) if n else x  # noqa: E731
    ids = repeat(ids, 1)
    mask = None if mask is None else repeat(mask, 1)
    pixels = None if pixel_values is None else repeat(np.asarray(pixel_values), pixel_rows)
    grid = None if image_grid_thw is None else repeat(np.asarray(image_grid_thw), images)
    return ids, pixels, mask, grid


def device_arrays(batch: HostBatch, mesh) -> tuple[Any, Any, Any, Any]:
    """(input_ids int32, attention_mask int32, pixel_values f32 | None, aux) as the jitted
    programs take them: on `mesh`, rows split over "data" and aux replicated; traced
    arrays (a caller's jit) pass through for that jit to place."""
    import jax.numpy as jnp

    ids, mask, pixels = batch.input_ids, batch.attention_mask, batch.pixel_values
    if mask is None:
        mask = np.ones(np.shape(ids), np.int32)
    if mesh is None or _is_traced(ids, mask, pixels):
        pixels = None if pixels is None else jnp.asarray(pixels, jnp.float32)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), pixels, batch.aux
    pixels = None if pixels is None else place(np.asarray(pixels, np.float32), mesh, "data")
    return (
        place(np.asarray(ids, np.int32), mesh, "data"),
        place(np.asarray(mask, np.int32), mesh, "data"),
        pixels,
        place_tree(batch.aux, mesh),
    )


def reject_video(**kwargs) -> None:
    """Video arguments (transformers' names) are not supported by any family here."""
    for name, value in kwargs.items():
        if value is not None:
            raise ValueError(f"{name} was given: video input is not supported (images only)")


def encode(
    vlm, prompts: str | Sequence[str], images=None, *, chat_template: bool | None = None
) -> dict[str, np.ndarray]:
    """Strings + images -> exactly the arrays the array API takes (transformers' names:
    input_ids, attention_mask, pixel_values and, for Qwen2.5-VL, image_grid_thw), through
    the checkpoint's saved processor."""
    from zspa_jax.inputs import check_vlm

    check_vlm(vlm)
    return adapter(vlm).encode(vlm, prompts, images, chat_template)
