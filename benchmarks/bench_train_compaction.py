#!/usr/bin/env python
"""AdaPonderLM training step (forward + backward) with ``ponder.train_compaction`` vs the
dense where-select forward (steps interleaved), at forced halting rates, against the ideal
passes ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train_compaction.py
        [--hidden 512 --layers 4 --heads 8 --seq 512 --batch 4 --vocab 2048 --steps 3]
        [--halt 0.25 0.5] [--reps 3] [--threads 2] [--clock wall|cpu]

Halting is forced with a forward hook on the gates: after the first pass a random fraction
``h`` of the tokens halts (gate logit -10, far below logit(tau)), every other gate says +10,
so the remaining tokens run all K+1 passes. The ideal ratio is the executed passes over the
dense ones, (1 + K (1 - h)) / (K + 1): what compaction would cost if packing, write-back and
attention's row padding were free. A small vocabulary keeps the pondering embedding (a
softmax over the vocab per token and pass) from dominating the layers. The script also
reports the loss difference of the two paths (expected 0 up to rounding). Reported: median
step seconds, wall clock by default; ``--clock cpu --threads 1`` counts this process's CPU
time instead, which other jobs on a shared machine disturb far less than the wall clock (the
numbers to take there)."""
import argparse
import copy
import json
import statistics
import time

import torch

from megaponder.config import ModelConfig, PonderConfig
from megaponder.models import build_model


def force_halting(model, frac: float, shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    halt = torch.rand(shape, generator=g) < frac

    def first(mod, inp, out):
        return torch.where(halt.unsqueeze(-1), -10.0, 10.0).to(out.dtype) + 0.0 * out

    def later(mod, inp, out):
        return torch.full_like(out, 10.0) + 0.0 * out

    for i, gate in enumerate(model.gates):
        gate.register_forward_hook(first if i == 0 else later)
    return float(halt.float().mean())


def step_times(models, ids, targets, reps: int, clock=time.perf_counter):
    """Median step time and last loss of each model, their steps interleaved (ABAB...) so a
    change in machine load hits both alike; the first round is a warm-up (allocator, thread
    pools)."""
    times, losses = [[] for _ in models], [None] * len(models)
    for r in range(reps + 1):
        for i, model in enumerate(models):
            model.zero_grad(set_to_none=True)
            t0 = clock()
            out = model(ids, targets=targets)
            out.loss.backward()
            dt = clock() - t0
            losses[i] = out.loss.item()
            if r:
                times[i].append(dt)
    return [statistics.median(t) for t in times], losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="ponder.steps K (K+1 passes)")
    ap.add_argument("--halt", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (loaded machines)")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(family="adaponderlm", vocab_size=args.vocab, hidden_size=args.hidden,
                      num_layers=args.layers, num_heads=args.heads, attention_backend=args.backend,
                      max_position_embeddings=max(args.seq, 64))
    base = build_model(cfg, PonderConfig(steps=args.steps)).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    targets = torch.roll(ids, -1, 1)
    rows = []
    for h in args.halt:
        dense = copy.deepcopy(base)
        real_h = force_halting(dense, h, (args.batch, args.seq))
        comp = copy.deepcopy(dense)
        comp.ponder_cfg.train_compaction = True
        (td, tc), (ld, lc) = step_times((dense, comp), ids, targets, args.reps, clock)
        ideal = (1 + args.steps * (1 - real_h)) / (args.steps + 1)
        row = {"halt": round(real_h, 4), "dense_s": round(td, 3), "compact_s": round(tc, 3),
               "ratio": round(tc / td, 3), "ideal": round(ideal, 3),
               "ratio_over_ideal": round(tc / td / ideal, 3), "loss_diff": abs(ld - lc)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
