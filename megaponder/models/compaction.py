"""Training-time compaction of AdaPonderLM's active rows (``ponder.train_compaction``).

The dense training forward runs every token through every pass and then discards, with
``where``, what a halted token computed: its new K/V (replaced by the reused ones), its hidden
state (the readout keeps its last active pass) and its gate and pondering update (multiplied
by ``new_active = False``). Compaction computes only the tokens still active at pass i > 0:
the active tokens of all rows are packed, row after row, into one flat [1, N] sequence (no
padding: every linear layer, the gates and the pondering update see exactly the N active
tokens), the stack runs on it with queries at their key indices and keys over each token's
whole row (halted tokens from their reused K/V), and results are written back with
``index_put`` (hidden states, K/V) or added (the pondering update). Only attention needs
rows: :func:`megaponder.models.attention.attention` lays the flat queries out as [B, A]
(A = the longest row, ``AttentionSpec.flat_queries``) for the kernel and back.

It is exact (forward and gradients) because halting is a *hard* threshold
(``m^{i+1} = m^i & (s^i >= tau)``, no straight-through): a halted token's later passes reach
the loss through nothing. That holds only with ``halted_readout: last_active`` (``final``
reads every token's last pass) and ``bottomk_pool: active`` (``all`` puts halted tokens'
later gate values into the loss); config validation refuses the other combinations.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .attention import AttentionSpec, FlatQueries


def pack_rows(mask: torch.Tensor, min_width: int = 0, counts: Optional[list] = None):
    """Left-align each row's True entries: (idx [B, A], valid [B, A]) with A the largest row
    count; padding slots point at distinct False positions of their row (a stable argsort
    puts them after the True ones), so a scatter through ``idx`` never writes one slot twice.
    ``counts``: the rows' True counts already read on the host (else read here: one sync)."""
    row_counts = mask.sum(1)
    if counts is None:
        counts = row_counts.tolist()
    width = max(max(counts, default=0), min_width)
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < row_counts.unsqueeze(1)
    return idx, valid


class RowCompaction:
    """One pass's packing of the active tokens; also the layers' kv_hook (KV reuse: the
    packed tokens' new K/V are written into the previous pass's full K/V)."""

    def __init__(self, active: torch.Tensor, prev_kv, detach: bool):
        seq = active.shape[1]
        # the one host read of the pass: the active count of every row fixes every shape below
        # (nonzero_static then needs no second read for its length)
        counts = active.sum(1).tolist()
        tokens = torch.nonzero_static(active.reshape(-1), size=sum(counts)).squeeze(1)  # row-major
        # a pass where every token has halted still runs the stack, on one halted token whose
        # results put() discards, so every layer and gate stays in the graph (zero gradients,
        # as in the dense forward) and the K/V outputs keep their shapes
        self.discard = tokens.numel() == 0
        if self.discard:
            tokens = tokens.new_zeros(1)
        self.row, self.col = tokens // seq, tokens % seq
        self.prev_kv, self.detach = prev_kv, detach
        # attention's row layout: slot (b, a) holds row b's a-th active token, which is flat
        # token start[b] + a (a < count[b]; padding slots repeat flat token 0)
        self.q_index, slot = pack_rows(active, min_width=1, counts=counts)
        counts = slot.sum(1)
        start = torch.cumsum(counts, 0) - counts
        width = self.q_index.shape[1]
        flat = start.unsqueeze(1) + torch.arange(width, device=active.device)
        rank_in_row = torch.arange(tokens.numel(), device=active.device) - start[self.row]
        self.queries = FlatQueries(to_rows=torch.where(slot, flat, torch.zeros_like(flat)).reshape(-1),
                                   from_rows=self.row * width + rank_in_row)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> the packed tokens [1, N, ...]."""
        return full[self.row, self.col].unsqueeze(0)

    def put(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``full`` [B, T, ...] with the packed tokens replaced by ``part`` [1, N, ...]."""
        if self.discard:
            part = torch.where(torch.zeros((), dtype=torch.bool, device=part.device), part, self.take(full))
        return full.index_put((self.row, self.col), part[0])

    def add(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``full`` plus ``part`` [1, N, ...] at the packed tokens (the caller's weights are 0
        for a discarded token: it has halted)."""
        return full.index_put((self.row, self.col), part[0], accumulate=True)

    def spread(self, part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``part`` [1, N, ...] at its tokens, zeros elsewhere (like's [B, T] shape)."""
        return self.put(part.new_zeros(like.shape[:2] + part.shape[2:]), part)

    def inputs(self, e: torch.Tensor, position_ids: torch.Tensor, spec: AttentionSpec):
        """Stack inputs of the packed tokens: embeddings, positions, and the spec with
        queries at their key indices (document masks and key padding carry over)."""
        pos = position_ids.expand(e.shape[0], -1) if position_ids.shape[0] != e.shape[0] else position_ids
        return (self.take(e), self.take(pos),
                dataclasses.replace(spec, q_index=self.q_index, flat_queries=self.queries))

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_prev, v_prev = self.prev_kv[layer]
        if self.detach:
            k_prev, v_prev = k_prev.detach(), v_prev.detach()
        # [B, H, T, D] seen as [B, T, H, D] so the (row, column) index picks whole tokens
        return tuple(self.put(prev.transpose(1, 2), new.transpose(1, 2)).transpose(1, 2)
                     for prev, new in ((k_prev, k), (v_prev, v)))
