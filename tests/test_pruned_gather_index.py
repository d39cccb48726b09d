"""`prefill.pruned_gather_index`, where each position of a pruned sequence comes from, against
its definition written out in numpy: the row's non-placeholder tokens in order, each kept entry
at its anchor (ties in the order given), an entry's source being its kept slot, not its anchor.
Merging methods (pool, visionzip's contextual tokens) anchor entries away from their slots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from zspa_jax.prefill import pruned_gather_index

LENGTH = 14
# Row 0: one image at 3..8; merged entries all anchored at the image's first slot.
# Row 1: two images (1..3 and 7..9); entries anchored at their own image's first slot.
SLOTS = np.array([[3, 4, 5, 6, 7, 8], [1, 2, 3, 7, 8, 9]])
KEPT_SLOTS = np.array([[4, 6, 8], [2, 3, 9]])
ANCHORS = np.array([[3, 3, 3], [1, 1, 7]])


def reference(slots, kept_slots, length, anchors):
    """(src, entry) per row, by sorting (sequence key, text before entries, given order)."""
    src, entry = [], []
    for b in range(len(slots)):
        visual = set(slots[b].tolist())
        items = [(p, 0, p, -1) for p in range(length) if p not in visual]
        items += [(int(anchors[b, k]), 1, int(kept_slots[b, k]), k) for k in range(len(anchors[b]))]
        items.sort(key=lambda t: (t[0], t[1], t[3]))
        src.append([t[2] for t in items])
        entry.append([t[3] for t in items])
    return np.array(src), np.array(entry)


@pytest.mark.parametrize("anchored", [True, False], ids=["merged-anchors", "at-their-slots"])
def test_gather_index_matches_its_definition(anchored):
    anchors = ANCHORS if anchored else KEPT_SLOTS
    src, entry = pruned_gather_index(
        jnp.asarray(SLOTS),
        jnp.asarray(KEPT_SLOTS),
        LENGTH,
        jnp.asarray(ANCHORS) if anchored else None,
    )
    ref_src, ref_entry = reference(SLOTS, KEPT_SLOTS, LENGTH, anchors)
    assert src.shape == entry.shape == (2, LENGTH - SLOTS.shape[1] + KEPT_SLOTS.shape[1])
    np.testing.assert_array_equal(np.asarray(entry), ref_entry)
    np.testing.assert_array_equal(np.asarray(src), ref_src)
    # An entry's source is its kept slot (its RoPE position), wherever it is anchored.
    kept = np.asarray(entry) >= 0
    np.testing.assert_array_equal(
        np.asarray(src)[kept], np.take_along_axis(KEPT_SLOTS, np.asarray(entry), 1)[kept]
    )
