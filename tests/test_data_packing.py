"""Document-aware packing helpers and active-token compaction."""
import numpy as np
import pytest
import torch

from megaponder.data import (block_causal_mask, cu_seqlens, gather_active, position_ids,
                             scatter_active, segment_ids)

EOD = 0
ROWS = [[5, 6, 0, 7, 8, 9, 0, 4], [0, 3, 3, 3, 3, 0, 0, 2]]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_positions_segments_cu_seqlens(kind):
    x = np.array(ROWS) if kind == "numpy" else torch.tensor(ROWS)
    pos, seg = position_ids(x, EOD), segment_ids(x, EOD)
    assert np.asarray(pos).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 0, 0]]
    assert np.asarray(seg).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 2, 3]]
    assert np.asarray(cu_seqlens(seg)).tolist() == [0, 3, 7, 8, 9, 14, 15, 16]
    assert np.asarray(position_ids(x[0], EOD)).tolist() == np.asarray(pos)[0].tolist()


def test_block_causal_mask_matches_megatron_semantics():
    seg = segment_ids(torch.tensor(ROWS), EOD)
    m = block_causal_mask(seg)
    assert m.shape == (2, 8, 8) and m.dtype == torch.bool
    # megatron reset_attention_mask: after EOD at i, later tokens see nothing at or before i
    ref = torch.tril(torch.ones(2, 8, 8, dtype=torch.bool))
    for b, row in enumerate(ROWS):
        for i, t in enumerate(row):
            if t == EOD:
                ref[b, i + 1:, :i + 1] = False
    assert torch.equal(m, ref)
    assert np.array_equal(block_causal_mask(np.asarray(seg)), ref.numpy())


def test_gather_scatter_active_round_trip():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.4
    buf, index = gather_active(x, mask)
    assert buf.shape == (int(mask.sum()), 4)
    assert torch.equal(buf, x[mask])
    out = torch.zeros_like(x)
    scatter_active(buf * 2, index, out)
    assert torch.equal(out[mask], x[mask] * 2) and torch.all(out[~mask] == 0)
    flat = torch.zeros(3, 5, dtype=torch.long)
    scatter_active(torch.ones(len(index), dtype=torch.long), index, flat)
    assert torch.equal(flat.bool(), mask)
