"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio * lr``
(GPT-NeoX/Pythia's shape)."""
from __future__ import annotations

import math

from ..config import OptimConfig


def lr_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Factor applied to ``optim.lr`` for the update made at optimizer step ``step`` (0-based)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine
