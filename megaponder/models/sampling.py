"""Drawing the next token from logits, shared by the cached and the uncached decoding loops."""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator) -> int:
    # sampled on the CPU with a CPU generator: the same seed gives the same tokens on any device
    logits = logits.detach().float().cpu()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
