#!/usr/bin/env python
"""Attention backends: forward(+backward) time of one attention call, as a ratio to the
``eager`` reference measured in the same run (absolute seconds on shared machines are noise).

    python benchmarks/bench_attention.py [--seq 512] [--heads 8] [--head-dim 64] [--batch 4] [--forward-only]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megaponder.models.attention import AttentionSpec, attention, available_backends  # noqa: E402


BACKWARD = True


def time_once(backend, q, k, v, spec):
    qq, kk, vv = (t.detach().requires_grad_(BACKWARD) for t in (q, k, v))
    start = time.perf_counter()
    with torch.set_grad_enabled(BACKWARD):
        out = attention(qq, kk, vv, spec, backend=backend)
        if BACKWARD:
            out.sum().backward()
    return time.perf_counter() - start


def ratios_to_eager(q, k, v, spec, repeats):
    """Backends are timed round-robin so that machine noise hits all of them alike; the
    result is the median over rounds of each backend's time divided by eager's."""
    backends = available_backends()
    for backend in backends:  # warm-up (and compilation, for compiled kernels)
        time_once(backend, q, k, v, spec)
    rounds = []
    for _ in range(repeats):
        t = {b: time_once(b, q, k, v, spec) for b in backends}
        rounds.append({b: t[b] / t["eager"] for b in backends})
    return {b: statistics.median(r[b] for r in rounds) for b in backends}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--forward-only", action="store_true",
                   help="time the forward pass only (FlexAttention has no CPU backward)")
    args = p.parse_args()
    global BACKWARD
    BACKWARD = not args.forward_only
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    bias = torch.log(torch.rand(args.batch, 1, 1, args.seq) + 1e-3)
    seg = (torch.arange(args.seq) >= args.seq // 2).long().expand(args.batch, -1)
    cases = {"causal": AttentionSpec(), "causal+documents": AttentionSpec(segment_ids=seg),
             "causal+key_bias": AttentionSpec(key_bias=bias)}
    print(f"attention {'fwd' if args.forward_only else 'fwd+bwd'}, B={args.batch} H={args.heads} T={args.seq} D={args.head_dim}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"| mask | backend | time vs eager |\n|---|---|---|")
    for name, spec in cases.items():
        for backend, ratio in ratios_to_eager(q, k, v, spec, args.repeats).items():
            if backend != "eager":
                print(f"| {name} | {backend} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
