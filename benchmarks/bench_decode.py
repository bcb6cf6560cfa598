#!/usr/bin/env python
"""AdaPonderLM inference: what halting saves in seconds. Times, as ratios to the dense
training-style forward on the same batch (measured in the same run):

  * ``rows``    — the KV-cached decoder one row after another (compaction within a row),
  * ``batched`` — all rows in lockstep with cross-row compaction (the default decoder),

for a whole-sequence prefill (scoring) and for token-by-token decoding, at several halting
thresholds ``ponder.tau`` (higher tau: more tokens halt early; the gates are untrained, so tau
only sets how many). Also printed: the fraction of (iteration, token) slots that were active
and the packing overhead of the batched decoder (computed slots / active slots).

    .venv/bin/python benchmarks/bench_decode.py [--batch 8 --seq 128 --hidden 256 --layers 4]
        [--taus 0.0001 0.8 0.87 0.92] [--repeats 3] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import time

from _configs import ROOT, sized_config  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megaponder.models import build_model  # noqa: E402
from megaponder.infer.decoders import decode_logits  # noqa: E402


def _median_time(fn, repeats):
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--decode-seq", type=int, default=32, help="tokens for the token-by-token case")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--taus", type=float, nargs="+", default=[1e-4, 0.8, 0.87, 0.92])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = sized_config("adaponderlm", a.hidden, a.layers, a.vocab, a.seq)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    short = ids[:, :a.decode_seq]
    print(f"adaponderlm d={a.hidden} L={a.layers} passes={model.num_passes} V={a.vocab}, "
          f"B={a.batch}, prefill T={a.seq}, token-by-token T={a.decode_seq}, {a.threads} threads")
    print(f"{'tau':>8} {'active':>7} {'padding':>8} | {'prefill rows':>12} {'batched':>8} | "
          f"{'decode rows':>11} {'batched':>8}   (time / dense forward)")
    for tau in a.taus:
        model.ponder_cfg.tau = tau
        with torch.no_grad():
            dense = _median_time(lambda: model(ids), a.repeats)
            dense_short = _median_time(lambda: model(short), a.repeats)
        rows = _median_time(lambda: [decode_logits(model, ids[b:b + 1]) for b in range(a.batch)], a.repeats)
        batched = _median_time(lambda: decode_logits(model, ids), a.repeats)
        rows_tok = _median_time(lambda: [decode_logits(model, short[b:b + 1], chunk=1)
                                         for b in range(a.batch)], a.repeats)
        batched_tok = _median_time(lambda: decode_logits(model, short, chunk=1), a.repeats)
        _, views = decode_logits(model, ids, return_decoders=True)
        dec = views[0].decoder
        active = dec.active_slots / (model.num_passes * a.batch * a.seq)
        padding = dec.computed_slots / dec.active_slots
        print(f"{tau:>8g} {active:>7.3f} {padding:>8.3f} | {rows / dense:>12.2f} {batched / dense:>8.2f} | "
              f"{rows_tok / dense_short:>11.2f} {batched_tok / dense_short:>8.2f}")


if __name__ == "__main__":
    main()
