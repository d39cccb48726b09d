"""Properties every model family has, one test each, parametrized over the family registry.

Each registered family has a `Case` here (a tiny random transformers model, converted in process by
the converter, and how to ask transformers for a reference); a test fails when a family is
registered without one. What holds for every family:
  * forward's logits of a left-padded batch equal transformers';
  * pruning keeps original positions: logits equal transformers fed the kept tokens'
    embeddings at their original positions (LLaVA with keep_positions=True; Qwen2.5-VL's
    3-D positions always);
  * every method the family serves (its record's capabilities against the method's) gives a
    row of a batch what it gives that row beside another neighbour (the batch in the other
    row order: the same shapes, so one compiled program per method); the two in-LLM
    methods (FastV, DART) also what they give the row alone, unpadded;
  * the checkpoint names its family and loads through the registry.

Per-family files keep what only their family has (several images per row, crop layouts,
videos, kept indices against eager references); the properties above are checked here only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zspa_jax
from models.checkpoint import CONFIG_NAME
from tests.support.tiny_llava_next import hf_pieces, hf_row_logits, tiny_llava_next
from tests.support.tiny_llava_next import rows as llava_next_rows
from tests.support.tiny_qwen2_5_vl import converted as qwen_converted
from tests.support.tiny_qwen2_5_vl import (
    hf_inputs,
    hf_pruned_row_logits,
    random_image,
    tiny_model,
)
from zspa_jax.families import FAMILIES
from zspa_jax.methods import METHODS

KEEP = 4
ROW_BOUND = 1e-5  # one row in two batches, or in a batch and alone: both zspa_jax
# Methods also run on each row alone (its own unpadded shape, a compile per row): the two
# that prune inside the LLM, where left padding meets attention scores. (ZSPAPrune's row of a
# padded batch is checked against transformers on the row alone above.)
ALONE = ("fastv", "dart")


class LlavaCase:
    family = "llava"
    bound = 1e-4  # logits vs transformers

    def __init__(self, tiny_hf_llava, converted):
        self.tiny = tiny_hf_llava("families")
        self.vlm = zspa_jax.load(converted(self.tiny.path))

    def batch(self) -> dict:
        t = self.tiny
        rng = np.random.default_rng(11)
        rows = [
            np.concatenate(
                [
                    [t.bos_token_id],
                    rng.integers(10, 290, b),
                    np.full(t.tokens_per_image, t.image_token_index),
                    rng.integers(10, 290, q),
                ]
            )
            for b, q in ((3, 9), (0, 5))
        ]
        width = max(map(len, rows))
        ids = np.full((2, width), t.pad_token_id, np.int64)
        mask = np.zeros((2, width), np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        px = rng.standard_normal((2, 3, t.image_size, t.image_size)).astype(np.float32)
        return {"input_ids": ids, "pixel_values": px, "attention_mask": mask}

    def swapped(self, batch: dict) -> dict:
        """The batch with its rows in the other order (each row keeps its padding)."""
        return {k: v[::-1].copy() for k, v in batch.items()}

    def row(self, batch: dict, i: int) -> dict:
        ids, mask = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
        real = mask[0] == 1
        return {
            "input_ids": ids[:, real],
            "pixel_values": batch["pixel_values"][i : i + 1],
            "attention_mask": mask[:, real],
        }

    def _embeds(self, batch):
        hf, t = self.tiny.hf, self.tiny
        ids = torch.as_tensor(batch["input_ids"])
        with torch.no_grad():
            embeds = hf.get_input_embeddings()(torch.where(ids == t.image_token_index, 0, ids))
            feats = hf.model.get_image_features(
                pixel_values=torch.as_tensor(batch["pixel_values"])
            ).pooler_output
            feats = (
                torch.cat(list(feats))
                if isinstance(feats, (list, tuple))
                else feats.reshape(-1, embeds.shape[-1])
            )
            embeds[ids == t.image_token_index] = feats
        return embeds

    def hf_logits(self, batch) -> np.ndarray:
        mask = torch.as_tensor(batch["attention_mask"])
        with torch.no_grad():
            return self.tiny.hf(
                input_ids=torch.as_tensor(batch["input_ids"]),
                pixel_values=torch.as_tensor(batch["pixel_values"]),
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            ).logits.numpy()

    def hf_pruned_row(self, batch, row: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """transformers on one row whose span keeps `kept`, at the kept tokens' original positions."""
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
        start = int(np.flatnonzero(ids == self.tiny.image_token_index)[0])
        src = np.concatenate(
            [
                np.arange(start),
                start + kept,
                np.arange(start + self.tiny.tokens_per_image, len(ids)),
            ]
        )
        positions = np.maximum(np.cumsum(mask) - 1, 0)
        with torch.no_grad():
            logits = (
                self.tiny.hf(
                    inputs_embeds=self._embeds(batch)[row, src][None],
                    attention_mask=torch.as_tensor(mask[src][None]),
                    position_ids=torch.as_tensor(positions[src][None]),
                )
                .logits[0]
                .numpy()
            )
        return logits, mask[src].astype(bool)

    keep_positions = True  # LLaVA renumbers by default; original positions are the option


class QwenCase:
    family = "qwen2_5_vl"
    bound = 1e-4

    def __init__(self, tiny_hf_llava, converted):
        self.tiny = tiny_model()
        self.vlm = zspa_jax.load(qwen_converted(self.tiny))

    def _hf_batch(self, order=(0, 1)):
        # Row 0: 5 x 7 merged tokens, row 1: 3 x 4, so the image spans are ragged.
        images = [random_image(40, 56, seed=50), random_image(24, 32, seed=51)]
        prompts = [("what is on the left", 1), ("describe it", 1)]
        return hf_inputs(
            self.tiny.processor, [prompts[i] for i in order], [images[i] for i in order]
        )

    def batch(self, order=(0, 1)) -> dict:
        b = {k: v.numpy() for k, v in self._hf_batch(order).items()}
        b.pop("mm_token_type_ids")
        return b

    def swapped(self, batch: dict) -> dict:
        return self.batch(order=(1, 0))

    def row(self, batch: dict, i: int) -> dict:
        grid = batch["image_grid_thw"]
        patches = np.prod(grid, axis=-1)
        lo, hi = int(patches[:i].sum()), int(patches[: i + 1].sum())
        real = batch["attention_mask"][i] == 1
        return {
            "input_ids": batch["input_ids"][i : i + 1, real],
            "attention_mask": batch["attention_mask"][i : i + 1, real],
            "pixel_values": batch["pixel_values"][lo:hi],
            "image_grid_thw": grid[i : i + 1],
        }

    def hf_logits(self, batch) -> np.ndarray:
        with torch.no_grad():
            return self.tiny.hf(**self._hf_batch()).logits.numpy()

    def hf_pruned_row(self, batch, row: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask, _, _ = hf_pruned_row_logits(self.tiny, self._hf_batch(), row, kept)
        return logits, mask

    keep_positions = False  # 3-D positions are always the original ones


class LlavaNextCase:
    family = "llava_next"
    bound = 1e-5

    def __init__(self, tiny_hf_llava, converted):
        self.tiny = tiny_llava_next()
        self.vlm = zspa_jax.load(self.tiny.out)

    def batch(self) -> dict:
        # Rows of 52 and 56 visual tokens (images of two sizes: different crop grids).
        return llava_next_rows(self.tiny, [(3, [(40, 70)], 6), (1, [(64, 30)], 4)], seed=13)

    def swapped(self, batch: dict) -> dict:
        return {k: v[::-1].copy() for k, v in batch.items()}

    def row(self, batch: dict, i: int) -> dict:
        real = batch["attention_mask"][i] == 1
        return {
            "input_ids": batch["input_ids"][i : i + 1, real],
            "attention_mask": batch["attention_mask"][i : i + 1, real],
            "pixel_values": batch["pixel_values"][i : i + 1],
            "image_sizes": batch["image_sizes"][i : i + 1],
        }

    def hf_logits(self, batch) -> np.ndarray:
        merged, _ = hf_pieces(self.tiny, batch)
        out = np.zeros(
            batch["input_ids"].shape + (self.tiny.hf.config.text_config.vocab_size,), np.float32
        )
        for row in range(2):
            out[row, batch["attention_mask"][row] == 1] = hf_row_logits(
                self.tiny, merged, batch, row, None
            )
        return out

    def hf_pruned_row(self, batch, row: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        merged, _ = hf_pieces(self.tiny, batch)
        logits = hf_row_logits(self.tiny, merged, batch, row, kept, keep_positions=True)
        return logits, np.ones(len(logits), bool)

    keep_positions = True


CASES = {c.family: c for c in (LlavaCase, QwenCase, LlavaNextCase)}


def test_every_registered_family_has_a_case():
    assert set(CASES) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tiny_hf_llava, converted):
    return CASES[request.param](tiny_hf_llava, converted)


def test_checkpoint_names_its_family(case):
    payload = json.loads((case.vlm.path / CONFIG_NAME).read_text())
    assert payload["model"] == case.family == case.vlm.family
    assert isinstance(case.vlm.config, FAMILIES[case.family].config_cls)


def test_forward_logits_of_a_left_padded_batch_match_transformers(case, parity_record):
    batch = case.batch()
    ours, mask = zspa_jax.forward(case.vlm, **batch, return_mask=True)
    ref = case.hf_logits(batch)
    real = batch["attention_mask"] == 1
    d = parity_record(
        "family logits (left-padded batch)",
        case.family,
        float(np.abs(ours[real] - ref[real]).max()),
        case.bound,
    )
    assert d <= case.bound


def test_pruned_logits_at_original_positions_match_transformers(case, parity_record):
    batch = case.batch()
    logits, kept, out_mask = zspa_jax.forward(
        case.vlm,
        **batch,
        prune=zspa_jax.PruneConfig(keep=KEEP),
        keep_positions=case.keep_positions,
        return_kept=True,
        return_mask=True,
    )
    for row in range(2):
        ref, ref_mask = case.hf_pruned_row(batch, row, kept[row])
        got = logits[row][out_mask[row].astype(bool)]
        d = parity_record(
            "family pruned logits (original positions)",
            f"{case.family} row {row}",
            float(np.abs(got - ref[ref_mask]).max()),
            1e-4,
        )
        assert d <= 1e-4


def _served(case):
    family = FAMILIES[case.family]
    for name, method in METHODS.items():
        try:
            family.check_method(zspa_jax.PruneConfig(keep=KEEP, method=name))
        except ValueError:
            continue
        if not method.needs_rng:  # a random subset depends on the batch's key, not on the row
            yield name


def _forward(vlm, batch, prune):
    logits, kept, mask = zspa_jax.forward(
        vlm, **batch, prune=prune, return_kept=True, return_mask=True
    )
    return logits, kept, mask.astype(bool)


@pytest.mark.slow
def test_each_served_method_gives_a_row_what_it_gives_the_row_elsewhere(case):
    """A row's kept indices and logits (at its real positions) do not depend on its neighbour
    or place in the batch (the batch in both row orders) nor, for ALONE, on the left padding
    and the ragged span's padded slots (the row alone)."""
    batch = case.batch()
    swapped = case.swapped(batch)
    served = list(_served(case))
    assert {"zspaprune", "fastv"} <= set(served)
    for name in served:
        layer = {"layer": 1} if METHODS[name].option("layer") else None  # in-LLM methods
        prune = zspa_jax.PruneConfig(keep=KEEP, method=name, options=layer)
        logits, kept, mask = _forward(case.vlm, batch, prune)
        other_logits, other_kept, other_mask = _forward(case.vlm, swapped, prune)
        for row in range(2):
            where = f"{case.family} {name} row {row}"
            np.testing.assert_array_equal(kept[row], other_kept[1 - row], err_msg=where)
            np.testing.assert_allclose(
                logits[row][mask[row]],
                other_logits[1 - row][other_mask[1 - row]],
                atol=ROW_BOUND,
                rtol=0,
                err_msg=where,
            )
            if name not in ALONE:
                continue
            alone, alone_kept, alone_mask = _forward(case.vlm, case.row(batch, row), prune)
            assert alone_mask.all()
            np.testing.assert_array_equal(kept[row], alone_kept[0], err_msg=f"{where} alone")
            np.testing.assert_allclose(
                logits[row][mask[row]], alone[0], atol=ROW_BOUND, rtol=0, err_msg=f"{where} alone"
            )
