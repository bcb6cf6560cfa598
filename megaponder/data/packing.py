"""Document-aware packing helpers and active-token compaction.

A packed sample holds several documents separated by EOD tokens; the EOD belongs to the document
it ends, and the next token starts a new document. From that:

* ``position_ids(tokens, eod)``   positions restart at 0 after every EOD;
* ``segment_ids(tokens, eod)``    0, 1, 2 … per document within the row;
* ``cu_seqlens(segment_ids)``     cumulative document lengths of the flattened batch (int32),
  what ``flash_attn_varlen_func`` expects;
* ``block_causal_mask(segment_ids)``  bool [B, T, T], True where query t may attend key s
  (s <= t and same document).

They accept numpy arrays or torch tensors of shape [T] or [B, T] and return the same kind.

``gather_active`` / ``scatter_active`` compact the still-active tokens of a batch into a dense
buffer and write results back (adaptive-depth inference runs extra iterations only on them).
"""
from __future__ import annotations

import numpy as np


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _starts(tokens, eod: int):
    """Bool, True at the first token of every document."""
    if _is_torch(tokens):
        import torch

        prev_eod = torch.zeros_like(tokens, dtype=torch.bool)
        prev_eod[..., 1:] = tokens[..., :-1] == eod
        prev_eod[..., 0] = True
        return prev_eod
    prev_eod = np.zeros(tokens.shape, dtype=bool)
    prev_eod[..., 1:] = tokens[..., :-1] == eod
    prev_eod[..., 0] = True
    return prev_eod


def segment_ids(tokens, eod: int):
    starts = _starts(tokens, eod)
    if _is_torch(tokens):
        import torch

        return torch.cumsum(starts.long(), dim=-1) - 1
    return np.cumsum(starts, axis=-1, dtype=np.int64) - 1


def position_ids(tokens, eod: int):
    starts = _starts(tokens, eod)
    if _is_torch(tokens):
        import torch

        idx = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
        start_of_doc = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=-1).values
        return idx - start_of_doc
    idx = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int64), tokens.shape)
    start_of_doc = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
    return idx - start_of_doc


def cu_seqlens(seg_ids):
    """[0, len(doc0), len(doc0)+len(doc1), …] over the rows of ``seg_ids`` flattened in order;
    a row boundary always ends a document."""
    if _is_torch(seg_ids):
        import torch

        s = seg_ids.reshape(-1, seg_ids.shape[-1])
        new = torch.ones_like(s, dtype=torch.bool)
        new[:, 1:] = s[:, 1:] != s[:, :-1]
        starts = torch.nonzero(new.reshape(-1), as_tuple=False).reshape(-1)
        total = torch.tensor([s.numel()], device=s.device)
        return torch.cat([starts, total]).to(torch.int32)
    s = np.asarray(seg_ids).reshape(-1, np.shape(seg_ids)[-1])
    new = np.ones(s.shape, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return np.concatenate([np.flatnonzero(new.reshape(-1)), [s.size]]).astype(np.int32)


def block_causal_mask(seg_ids):
    """Bool [B, T, T] (or [T, T]): query t attends key s iff s <= t and same segment."""
    if _is_torch(seg_ids):
        import torch

        t = seg_ids.shape[-1]
        causal = torch.ones(t, t, dtype=torch.bool, device=seg_ids.device).tril()
        same = seg_ids.unsqueeze(-1) == seg_ids.unsqueeze(-2)
        return same & causal
    t = np.shape(seg_ids)[-1]
    causal = np.tril(np.ones((t, t), dtype=bool))
    seg_ids = np.asarray(seg_ids)
    return (seg_ids[..., :, None] == seg_ids[..., None, :]) & causal


def gather_active(x, mask):
    """Rows of ``x`` [B, T, ...] where ``mask`` [B, T] is True, as a dense [N, ...] buffer, plus
    the flat index (into B*T) of each, for :func:`scatter_active`."""
    import torch

    index = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    flat = x.reshape(-1, *x.shape[mask.dim():])
    return flat.index_select(0, index), index


def scatter_active(buf, index, out):
    """Write ``buf`` [N, ...] back to the positions ``index`` of ``out`` [B, T, ...] (in place on
    a flat view, returned). Positions not in ``index`` keep their values."""
    if not out.is_contiguous():
        raise ValueError("scatter_active needs a contiguous 'out' (it writes through a flat view).")
    flat = out.view(-1, *out.shape[out.dim() - buf.dim() + 1:]) if buf.dim() > 1 else out.view(-1)
    flat.index_copy_(0, index, buf.to(flat.dtype))
    return out
