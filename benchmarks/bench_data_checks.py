#!/usr/bin/env python
"""Cost of the input checks on open and at train start, on a synthetic dataset.

    python benchmarks/bench_data_checks.py [--sequences 10000000] [--tokens-per-sequence 4]

Prints: opening the dataset with the pointer/size consistency check and without it (the old
checks only: header, file sizes, sizes sum), best of 3; and the full min/max token scan that the
train-start check runs when a dataset has no .meta.json sidecar.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megaponder.data.indexed as ix  # noqa: E402
from megaponder.data.checks import token_range  # noqa: E402


def best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sequences", type=int, default=10_000_000)
    p.add_argument("--tokens-per-sequence", type=int, default=4)
    args = p.parse_args()
    n, k = args.sequences, args.tokens_per_sequence
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "d")
        ix.write_index(prefix + ".idx", np.uint16, np.full(n, k, np.int32), np.arange(n + 1))
        np.random.default_rng(0).integers(0, 50000, n * k, dtype=np.uint16).tofile(prefix + ".bin")
        with_check = best_of(lambda: ix.IndexedDataset(prefix))
        full = ix.IndexedDataset._check_bin

        def sizes_only(self):  # what the reader checked before the pointer check existed
            total = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
            assert total == os.path.getsize(self.bin_path)

        ix.IndexedDataset._check_bin = sizes_only
        without = best_of(lambda: ix.IndexedDataset(prefix))
        ix.IndexedDataset._check_bin = full
        ds = ix.IndexedDataset(prefix)
        scan = best_of(lambda: token_range(ds))
    print(f"open {n:,} sequences: {with_check:.3f} s with the pointer check, {without:.3f} s "
          f"without (check: {with_check - without:.3f} s)")
    print(f"full min/max scan of {n * k * 2 / 2**20:,.0f} MiB of uint16 tokens: {scan:.3f} s "
          f"({n * k * 2 / 2**30 / scan:.1f} GiB/s)")


if __name__ == "__main__":
    main()
