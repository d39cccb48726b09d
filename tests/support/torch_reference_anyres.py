"""VisPruner and VisionZip on LLaVA-NeXT (anyres) in the official code's shape, eager PyTorch.

Each crop of an image (the base view first, then the crop grid row by row) runs through the
tower on its own and keeps K of its tokens by its own [CLS] attention
(`tests.torch_reference_pruning`); the kept tokens are then laid out as the official
LLaVA-NeXT paths do:

  * VisPruner (github.com/Theia-4869/VisPruner, `llava/model/llava_arch.py`,
    `prepare_inputs_labels_for_multimodal`: `mm_patch_merge_type.replace('_unpad', '')`, so
    the "spatial" branch): the base view's kept tokens in ascending order, then an index mask
    over the crop grid's whole feature map read in raster order; no unpadding, no newlines.
  * VisionZip (github.com/dvlab-research/VisionZip, `visionzip/llava_arch.py`,
    `restore_image_features_sorted`): the base view's tokens as the tower returns them
    ([CLS], dominant patches ascending, contextual), then the crops' dominant patches put back
    into the whole crop-grid map and read in raster order, then every crop's [CLS], then every
    crop's contextual tokens; no unpadding, no newlines.

Each function returns the tower-space tokens [T, Dv] in sequence order and, for each, its
(crop, tower token) source: the token itself, or for a new token the one whose slot it takes
([CLS]: token 0 of its crop; contextual: its target), so a caller can map it to a slot.
"""

from __future__ import annotations

import torch

from tests.support.torch_reference_pruning import visionzip_reference, vispruner_reference


def _grid(kept: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """[crops, side * side] (crop-major, as the tower rows) -> the whole map [rows * side, cols * side]."""
    rows, cols = grid
    return (
        kept.view(rows, cols, side, side, *kept.shape[2:])
        .permute(0, 2, 1, 3, *range(4, kept.dim() + 2))
        .reshape(rows * side, cols * side, *kept.shape[2:])
    )


def _source_ids(crops: int, tokens: int) -> torch.Tensor:
    """int64 [crops, tokens, 2]: (crop, token) of every tower token."""
    c = torch.arange(crops)[:, None].expand(crops, tokens)
    t = torch.arange(tokens)[None, :].expand(crops, tokens)
    return torch.stack([c, t], dim=-1)


def vispruner_anyres(
    features: torch.Tensor,
    cls_attention: torch.Tensor,
    *,
    keep: int,
    grid: tuple[int, int],
    side: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """features [crops, P, Dv] (base view first), cls_attention [crops, P] -> (tokens [T, Dv],
    sources int64 [T, 2] of (crop, token)), T = crops * keep."""
    crops, tokens, _ = features.shape
    kept = vispruner_reference(features, cls_attention, keep=keep)  # [crops, keep], ascending
    mask = torch.zeros(crops, tokens, dtype=torch.bool)
    mask.scatter_(1, kept, True)
    ids = _source_ids(crops, tokens)
    base, base_ids = features[0][mask[0]], ids[0][mask[0]]
    grid_mask = _grid(mask[1:], grid, side)
    out = torch.cat([base, _grid(features[1:], grid, side)[grid_mask]])
    return out, torch.cat([base_ids, _grid(ids[1:], grid, side)[grid_mask]])


def visionzip_anyres(
    hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    *,
    keep: int,
    grid: tuple[int, int],
    side: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [crops, 1 + P, Dv] ([CLS] at 0, base view first), cls_attention [crops, 1 + P],
    keys [crops, 1 + P, Dh] -> (tokens [T, Dv], sources int64 [T, 2] of (crop, token)), T =
    crops * keep."""
    crops, length, _ = hidden.shape
    tokens = length - 1
    merged, slots = visionzip_reference(
        hidden, cls_attention, keys, keep=keep
    )  # [crops, K, Dv]; patch slots
    contextual = min(int(keep * 10 / 64 + 0.5), keep - 1)
    dominant = keep - contextual
    ids = torch.stack(
        [torch.arange(crops)[:, None].expand(crops, keep), slots], dim=-1
    )  # [crops, K, 2]
    base, base_ids = merged[0], ids[0]
    # restore_image_features_sorted: dominant patches back into each crop's map, read in raster order.
    mask = torch.zeros(crops - 1, tokens, dtype=torch.bool)
    mask.scatter_(1, slots[1:, 1:dominant], True)
    restored = torch.zeros(crops - 1, tokens, hidden.shape[-1])
    restored[mask] = merged[1:, 1:dominant].reshape(-1, hidden.shape[-1])
    restored_ids = torch.zeros(crops - 1, tokens, 2, dtype=torch.long)
    restored_ids[mask] = ids[1:, 1:dominant].reshape(-1, 2)
    grid_mask = _grid(mask, grid, side)
    out = torch.cat(
        [
            base,
            _grid(restored, grid, side)[grid_mask],
            merged[1:, 0],
            merged[1:, dominant:].reshape(-1, hidden.shape[-1]),
        ]
    )
    out_ids = torch.cat(
        [
            base_ids,
            _grid(restored_ids, grid, side)[grid_mask],
            ids[1:, 0],
            ids[1:, dominant:].reshape(-1, 2),
        ]
    )
    return out, out_ids
