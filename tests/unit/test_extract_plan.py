"""The extraction job's Ray Data blocks (no Ray): whole embedding batches, so that no batch the
embedding actor gets is padded except the very last."""

from __future__ import annotations

import pandas as pd
import pytest

from dermray.stages.raysession import batch_blocks


@pytest.mark.parametrize("n, batch, max_blocks, sizes", [
    (10_033, 32, 200, [64] * 156 + [49]),
    (1_031, 32, 200, [32] * 32 + [7]),
    (100, 16, 3, [48, 48, 4]),
    (5, 32, 200, [5]),
    (0, 32, 200, [0]),
])
def test_blocks_are_whole_batches(n, batch, max_blocks, sizes):
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)]})
    blocks = batch_blocks(frame, batch, max_blocks)
    assert [len(b) for b in blocks] == sizes
    assert len(blocks) <= max_blocks
    assert pd.concat(blocks)["image_id"].tolist() == frame["image_id"].tolist()  # all, in order
