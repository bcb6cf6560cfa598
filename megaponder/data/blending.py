"""Weighted blending of several datasets (Megatron's / GPT-NeoX's shared algorithm).

For output sample i, pick the dataset whose share lags furthest behind its weight —
argmax_k(w_k · max(i, 1) − drawn_k), first index on ties — and take that dataset's next sample.
Deterministic, no RNG; the same rows as megatron-core's ``helpers.build_blending_indices``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    return (w / w.sum()).tolist()


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """→ (dataset_index int16 [size], dataset_sample_index int64 [size]) for normalized weights."""
    w = [float(x) for x in weights]
    k = len(w)
    drawn = [0] * k
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    # A plain loop: each step depends on the previous counts. ~1 µs per sample per dataset.
    for i in range(size):
        x = float(max(i, 1))
        best, best_err = 0, w[0] * x - drawn[0]
        for d in range(1, k):
            err = w[d] * x - drawn[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        sample_index[i] = drawn[best]
        drawn[best] += 1
    return dataset_index, sample_index


def per_dataset_samples(weights: Sequence[float], num_samples: int, mode: str) -> list[int]:
    """Samples to build from each blended dataset: GPT-NeoX ceil(n·w·1.005); megatron-core
    ceil(ceil(n·w)·1.005). The 0.5% surplus absorbs the blending's rounding."""
    if mode == "pythia":
        return [int(math.ceil(num_samples * w * 1.005)) for w in weights]
    return [int(math.ceil(math.ceil(num_samples * w) * 1.005)) for w in weights]


class BlendedDataset:
    """``ds[i]`` = ``datasets[dataset_index[i]][dataset_sample_index[i]]`` (the source dataset of
    sample i is ``dataset_index[i]``; it is not added to the item so batches stay uniform)."""

    def __init__(self, datasets: list, weights: Sequence[float], size: int):
        if len(datasets) != len(weights):
            raise ValueError("one weight per dataset is needed")
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size)
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (need, ds) in enumerate(zip(counts, datasets)):
            if need > len(ds):
                raise ValueError(f"the blend draws {need} samples from dataset {d} "
                                 f"({getattr(ds, 'name', '')}) which only has {len(ds)}.")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
