"""Deterministic data-parallel sampling that resumes from a consumed-samples count.

The global sample stream is 0, 1, 2, … (positions in the shuffled dataset, wrapping around its
length for extra epochs). A *global micro-batch* is ``micro_batch_size × dp_size`` consecutive
positions; data-parallel rank r takes the r-th contiguous slice of ``micro_batch_size``
(Megatron's / GPT-NeoX's ``MegatronPretrainingSampler``). An optimizer step with gradient
accumulation consumes ``global_batch = micro_batch_size × dp_size × grad_accum`` positions.

So the order depends only on the dataset and the consumed count — never on how a run was
interrupted — and a resumed run (``consumed_samples = step × global_batch``) sees exactly the
samples an uninterrupted run would see next.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def _check(micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int) -> None:
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
    if consumed_samples % (micro_batch_size * dp_size):
        raise ValueError(f"consumed_samples ({consumed_samples}) must be a multiple of "
                         f"micro_batch_size x dp_size ({micro_batch_size * dp_size}); resume "
                         f"from an optimizer-step boundary.")


def micro_batch_positions(consumed_samples: int, micro_batch_size: int, dp_rank: int,
                          dp_size: int) -> np.ndarray:
    """Stream positions of this rank's share of the global micro-batch starting at ``consumed``."""
    start = consumed_samples + dp_rank * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)


def step_micro_batches(step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, dataset_len: int) -> list[np.ndarray]:
    """Dataset indices of every micro-batch that rank ``dp_rank`` processes in optimizer step
    ``step`` (0-based), for a constant global batch size."""
    per_micro = micro_batch_size * dp_size
    if global_batch_size % per_micro:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro_batch_size "
                         f"x dp_size = {per_micro}")
    consumed = step * global_batch_size
    return [micro_batch_positions(consumed + m * per_micro, micro_batch_size, dp_rank, dp_size)
            % dataset_len for m in range(global_batch_size // per_micro)]


class MicroBatchSampler:
    """Infinite iterator of this rank's micro-batches (lists of dataset indices), starting after
    ``consumed_samples``. Usable as a ``torch.utils.data.DataLoader`` ``batch_sampler``."""

    def __init__(self, dataset_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        if dataset_len < 1:
            raise ValueError("cannot sample from an empty dataset")
        _check(micro_batch_size, dp_rank, dp_size, consumed_samples)
        self.dataset_len = dataset_len
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            pos = micro_batch_positions(self.consumed_samples, self.micro_batch_size,
                                        self.dp_rank, self.dp_size)
            # advance before yielding: consumed counts every rank's share of this micro-batch
            self.consumed_samples += self.micro_batch_size * self.dp_size
            yield (pos % self.dataset_len).tolist()
