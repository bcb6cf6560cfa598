#!/usr/bin/env python
"""``megaponder plan`` against the memory measured in real training, per rank.

Runs 2 gloo processes that train a small AdaPonderLM (fp32, d=64, 4 layers, vocab 512, seq 64,
micro-batch 4, 2 micro-batches per step, 3 DeepSpeed steps) at ZeRO 0-3 over dp=2, tp=2 and
pp=2, measuring each rank's peak of live tensor bytes (megaponder/train/memory.py LiveBytes on
the real tensors: weights, gradients, Adam state, DeepSpeed's buffers, activations), and prints
the plan's per-rank total next to it (the plan: model states by formula, activations measured
on fake tensors; megaponder/train/plan.py). Same setup as tests/test_plan.py.

    .venv/bin/python benchmarks/bench_plan.py [--family adaponderlm] [--micro-batch 4]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args()
    from dist_utils import run_distributed
    from megaponder.train.plan import plan
    from test_plan import LAYOUTS, _config, _measure
    measured = run_distributed(_measure, 2, (LAYOUTS,))
    print("| layout | rank | plan MB (weights + grads + optimizer + buckets + activations) | measured peak MB | plan / measured |")
    print("|---|---|---|---|---|")
    for name, tp, pp, zero in LAYOUTS:
        plans = {q.pp_rank: q for q in plan(_config(tp, pp, zero), 2)}
        for rank, per_rank in enumerate(measured):
            got = per_rank[name]
            q = plans[got["pp_rank"]]
            parts = " + ".join(f"{x / 2**20:.2f}" for x in (q.weights, q.gradients, q.optimizer,
                                                            q.buckets, q.activations))
            print(f"| {name} | {rank} | {q.total / 2**20:.2f} = {parts} | {got['peak'] / 2**20:.2f} | "
                  f"{q.total / got['peak']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
