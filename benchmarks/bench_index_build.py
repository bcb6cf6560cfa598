#!/usr/bin/env python
"""Index building time: megaponder's numpy implementation vs megatron-core's GPTDataset path
(python doc/shuffle index + compiled helpers_cpp sample index), same corpus and sample counts.

    python benchmarks/bench_index_build.py [--demo-dir data/demo]
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaponder.data import IndexedDataset  # noqa: E402
from megaponder.data.demo import prepare_demo_corpus  # noqa: E402
from megaponder.data.sample_index import build_megatron_indices, num_epochs_megatron  # noqa: E402


def megatron_core_indices(sizes, documents, seq_length, num_samples, seed):
    """megatron-core's own construction (its private helpers, exactly as GPTDataset calls them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    tokens = int(sizes[documents].sum())
    epochs = num_epochs_megatron(tokens, seq_length, num_samples)
    sep = False
    if epochs > 1:
        without = ((epochs - 1) * tokens - 1) // seq_length
        sep = num_samples - without < int(0.8 * ((tokens - 1) // seq_length))
    rng = np.random.RandomState(seed)
    doc = _build_document_index(documents, epochs, rng, sep)
    sample = helpers.build_sample_idx(sizes, doc, seq_length, epochs, tokens, True, True)
    n = sample.shape[0] - 1
    shuffle = _build_shuffle_index(without if sep else n, n, rng)
    return doc, sample, shuffle


def best_interleaved(fa, fb, repeat):
    """Best time of each, the two alternating run by run, so a burst of load on the shared
    machine hits both sides instead of one."""
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            if fn is fa:
                out_a = out
            else:
                out_b = out
    return min(ta), out_a, min(tb), out_b


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--demo-dir", default="data/demo")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    prepare_demo_corpus(args.demo_dir, log=lambda *a: None)
    ds = IndexedDataset(os.path.join(args.demo_dir, "train_text_document"))
    docs = np.arange(len(ds), dtype=np.int32)
    sizes = np.array(ds.sizes)
    print(f"demo train split: {len(ds)} docs, {ds.num_tokens} tokens; best of {args.repeat}, interleaved")
    print("| seq_length | samples | epochs | megaponder numpy (ms) | megatron-core + helpers_cpp (ms) | ratio | equal |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for seq, n in ((128, 7_000), (128, 1_000_000), (2048, 1_000_000), (512, 10_000_000)):
        t_ours, ours, t_ref, ref = best_interleaved(
            lambda: build_megatron_indices(sizes, docs, seq, n, 1234),
            lambda: megatron_core_indices(sizes, docs, seq, n, 1234), args.repeat)
        same = all(np.array_equal(a, b) for a, b in zip(ours, ref))
        epochs = num_epochs_megatron(ds.num_tokens, seq, n)
        print(f"| {seq} | {n:,} | {epochs} | {t_ours * 1e3:.1f} | {t_ref * 1e3:.1f} | "
              f"{t_ours / t_ref:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
