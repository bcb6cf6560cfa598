"""``--batch_size auto`` for ``megaponder lm-eval``: a batch size that fits, picked once.

lm-eval's requests are short (a few dozen tokens for the offline cloze tasks) and scored one
padded forward per batch, so at batch size 1 a CPU spends most of its time in per-forward
overhead rather than in the matmuls.

- CUDA: real forwards of ``[b, max_length]`` with b doubling from 1 until one runs out of
  memory (or reaches :data:`MAX_AUTO_BATCH`); the largest that fit, halved once for headroom
  (lm-eval's own ``auto`` probes the same way).
- CPU: the largest power of two whose estimated activations (logits in fp32 for the softmax,
  plus the backbone's hidden states per pass) stay under an eighth of the available memory.
"""
from __future__ import annotations

import os

import torch

MAX_AUTO_BATCH = 64
#: bytes per token of one row, per unit of (vocab) and of (hidden x layers x passes): the
#: logits, their float copy and log-softmax; ~16 activations of the hidden size per layer
LOGIT_COPIES, HIDDEN_COPIES = 3, 16


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def estimated_row_bytes(model, max_length: int) -> int:
    """Activation bytes of one ``max_length`` row in a no-grad forward (an estimate)."""
    cfg = model.cfg
    passes = max(1, int(getattr(getattr(model, "ponder_cfg", None), "steps", 0) or 0) + 1)
    per_token = 4 * (LOGIT_COPIES * cfg.padded_vocab()
                     + HIDDEN_COPIES * cfg.hidden_size * cfg.num_layers * passes)
    return per_token * max_length


def _fits_on_cuda(model, batch: int, max_length: int, device) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros((batch, max_length), dtype=torch.long, device=device))
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def pick_batch_size(requested, model, max_length: int, device) -> int:
    """``requested`` as an int, or for ``auto`` (lm-eval also passes ``auto:N``) the size
    described in the module docstring."""
    if not str(requested).startswith("auto"):
        return max(1, int(requested))
    device = torch.device(device)
    if device.type == "cuda":
        batch = 1
        while batch < MAX_AUTO_BATCH and _fits_on_cuda(model, batch * 2, max_length, device):
            batch *= 2
        return max(1, batch // 2) if batch > 1 else 1
    fit = _available_memory() // 8 // max(1, estimated_row_bytes(model, max_length))
    batch = 1
    while batch * 2 <= min(fit, MAX_AUTO_BATCH):
        batch *= 2
    return batch
