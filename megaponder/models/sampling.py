"""Drawing the next token from logits, shared by the cached and the uncached decoding loops."""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator) -> int:
    # sampled on the CPU with a CPU generator: the same seed gives the same tokens on any device
    return int(sample_rows(logits.detach().float().cpu().view(1, -1), temperature, top_k, generator)[0])


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    """The next token [B] of every row of ``logits`` [B, V], on their device (no host read):
    greedy at temperature <= 0, else softmax(logits / temperature) over the top_k (0: all)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).view(-1)
