#!/usr/bin/env python
"""Index building time: megaponder (with its compiled sample index, and on its numpy path) vs
megatron-core's GPTDataset path (python doc/shuffle index + compiled helpers_cpp sample index),
same corpus and sample counts.

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
from megaponder.data import sample_index  # noqa: E402
from megaponder.data.sample_index import (build_megatron_indices, build_sample_idx,  # noqa: E402
                                          num_epochs_megatron, numpy_sample_index)


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


def best_interleaved(fns, repeat):
    """Best time of each function and its last output, the functions taking turns run by run, so
    a burst of load on the shared machine hits every side instead of one."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return [min(t) for t in times], outs


def megaponder_numpy_indices(*args):
    with numpy_sample_index():
        return build_megatron_indices(*args)


def numpy_sample_idx(*args):
    with numpy_sample_index():
        return build_sample_idx(*args)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--demo-dir", default="data/demo")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if sample_index._compiled is None:
        sys.exit("the sample-index extension is not built (pip install -e . or "
                 "python setup.py build_ext --inplace); this benchmark compares it with numpy")
    prepare_demo_corpus(args.demo_dir, log=lambda *a: None)
    ds = IndexedDataset(os.path.join(args.demo_dir, "train_text_document"))
    docs = np.arange(len(ds), dtype=np.int32)
    sizes = np.array(ds.sizes)
    print(f"demo train split: {len(ds)} docs, {ds.num_tokens} tokens; best of {args.repeat}, "
          f"the three sides interleaved")
    print("| seq_length | samples | epochs | megaponder ext (ms) | megaponder numpy (ms) | "
          "megatron-core + helpers_cpp (ms) | ext / megatron | numpy / megatron | equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for seq, n in ((128, 7_000), (128, 1_000_000), (2048, 1_000_000), (512, 10_000_000)):
        (t_ext, t_np, t_ref), (ext, ours_np, ref) = best_interleaved(
            [lambda: build_megatron_indices(sizes, docs, seq, n, 1234),
             lambda: megaponder_numpy_indices(sizes, docs, seq, n, 1234),
             lambda: megatron_core_indices(sizes, docs, seq, n, 1234)], args.repeat)
        same = all(np.array_equal(a, b) and np.array_equal(c, b)
                   for a, c, b in zip(ext, ours_np, ref))
        epochs = num_epochs_megatron(ds.num_tokens, seq, n)
        print(f"| {seq} | {n:,} | {epochs} | {t_ext * 1e3:.1f} | {t_np * 1e3:.1f} | "
              f"{t_ref * 1e3:.1f} | {t_ext / t_ref:.2f} | {t_np / t_ref:.2f} | "
              f"{'yes' if same else 'NO'} |")
    print()
    print("sample index alone (same doc index for all three):")
    print("| seq_length | samples | ext (ms) | numpy (ms) | helpers_cpp (ms) | ext / helpers_cpp | "
          "numpy / helpers_cpp |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
    for seq, n in ((128, 1_000_000), (2048, 1_000_000), (512, 10_000_000)):
        doc = build_megatron_indices(sizes, docs, seq, n, 1234)[0]
        epochs = num_epochs_megatron(ds.num_tokens, seq, n)
        rows = (epochs * ds.num_tokens - 1) // seq
        (t_ext, t_np, t_ref), _ = best_interleaved(
            [lambda: build_sample_idx(sizes, doc, seq, rows),
             lambda: numpy_sample_idx(sizes, doc, seq, rows),
             lambda: helpers.build_sample_idx(sizes, doc, seq, epochs, ds.num_tokens, True, True)],
            args.repeat)
        print(f"| {seq} | {n:,} | {t_ext * 1e3:.1f} | {t_np * 1e3:.1f} | {t_ref * 1e3:.1f} | "
              f"{t_ext / t_ref:.2f} | {t_np / t_ref:.2f} |")


if __name__ == "__main__":
    main()
