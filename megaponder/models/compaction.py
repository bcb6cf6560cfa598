"""Training-time compaction of AdaPonderLM's active rows (``ponder.train_compaction``).

The dense training forward runs every token through every pass and then discards, with
``where``, what a halted token computed: its new K/V (replaced by the reused ones), its hidden
state (the readout keeps its last active pass) and its gate and pondering update (multiplied
by ``new_active = False``). Compaction computes only the tokens still active at pass i > 0:
each row's active tokens are packed left-aligned into a [B, A] buffer (A = the largest count
of any row; shorter rows get padding slots that point at distinct halted positions), the stack
runs on that buffer with queries at their key indices (``AttentionSpec.q_index``) and keys
over the whole row (halted tokens from their reused K/V), and results are scattered back.

It is exact (forward and gradients) because halting is a *hard* threshold
(``m^{i+1} = m^i & (s^i >= tau)``, no straight-through): a halted token's later passes reach
the loss through nothing. That holds only with ``halted_readout: last_active`` (``final``
reads every token's last pass) and ``bottomk_pool: active`` (``all`` puts halted tokens'
later gate values into the loss); config validation refuses the other combinations.
"""
from __future__ import annotations

import dataclasses

import torch

from .attention import AttentionSpec


def pack_rows(mask: torch.Tensor, min_width: int = 0):
    """Left-align each row's True entries: (idx [B, A], valid [B, A]) with A the largest row
    count; padding slots point at distinct False positions of their row (a stable argsort
    puts them after the True ones), so a scatter through ``idx`` never writes one slot twice."""
    counts = mask.sum(1)
    width = max(int(counts.max()), min_width)
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


def _along(index: torch.Tensor, like: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """[B, A] ``index`` broadcast to ``like``'s shape with size ``width`` along ``dim``."""
    shape = [index.shape[0]] + [1] * (dim - 1) + [index.shape[1]] + [1] * (like.dim() - dim - 1)
    size = list(like.shape)
    size[dim] = width
    return index.view(shape).expand(size)


class RowCompaction:
    """One pass's packing of the active tokens; also the layers' kv_hook (KV reuse: the
    packed tokens' new K/V are written into the previous pass's full K/V)."""

    def __init__(self, active: torch.Tensor, prev_kv, detach: bool):
        # at least one (padding) slot: a pass where every token has halted still runs the
        # stack once, so its K/V outputs keep their shapes (nothing of it is kept)
        self.idx, self.slot = pack_rows(active, min_width=1)
        self.prev_kv, self.detach = prev_kv, detach

    def take(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The packed slots of ``full`` ([B, T, ...] with dim=1)."""
        return full.gather(dim, _along(self.idx, full, dim, self.idx.shape[1]))

    def put(self, full: torch.Tensor, part: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``full`` with its active tokens replaced by ``part``'s real slots (padding slots
        write back full's own values, so their gradient reaches full, not part)."""
        index = _along(self.idx, full, dim, part.shape[dim])
        keep = _along(self.slot, part, dim, part.shape[dim])
        return full.scatter(dim, index, torch.where(keep, part, full.gather(dim, index)))

    def spread(self, part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``part`` at its tokens' positions, zeros elsewhere (like's shape and dtype)."""
        return self.put(torch.zeros(like.shape, dtype=part.dtype, device=part.device), part)

    def inputs(self, e: torch.Tensor, position_ids: torch.Tensor, spec: AttentionSpec):
        """Stack inputs of the packed tokens: embeddings, positions, and the spec with
        queries at their key indices (document masks and key padding carry over)."""
        pos = position_ids.expand(e.shape[0], -1) if position_ids.shape[0] != e.shape[0] else position_ids
        return self.take(e), pos.gather(1, self.idx), dataclasses.replace(spec, q_index=self.idx)

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_prev, v_prev = self.prev_kv[layer]
        if self.detach:
            k_prev, v_prev = k_prev.detach(), v_prev.detach()
        return self.put(k_prev, k, dim=2), self.put(v_prev, v, dim=2)
