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

``--static``: token-by-token decoding speed (new tokens/s after a prompt) of the static-shape
decoder (megaponder/models/static_cache.py), eager and with its compiled step (Inductor;
CUDA graphs on CUDA), vs the compacting decoder, interleaved in the same run, for vanilla and
AdaPonderLM (halting forced so that ``--halted`` of the pondering slots halt) at the shapes
``--shapes`` (HIDDENxLAYERS) and batch sizes ``--batches``; also checks that the decoders'
logits agree (max |difference| column) and their greedy tokens are equal.

    .venv/bin/python benchmarks/bench_decode.py --static [--families vanilla adaponderlm]
        [--shapes 128x2 256x4] [--batches 1 8]
        [--prompt 32 --new-tokens 64] [--cache-len N] [--halted 0.5] [--repeats 3] [--threads 1]
        [--device cpu]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

# benchmarks/_configs.py
from _configs import ROOT, calibrate_tau, sized_config, time_token_by_token  # noqa: E402

sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megaponder.models import build_model  # noqa: E402
from megaponder.models.decoders import decode_logits, make_decoder  # noqa: E402
from megaponder.models.static_cache import make_static_decoder  # noqa: E402


def _median_time(fn, repeats):
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def static_decode(a):
    device = torch.device(a.device)
    seq = a.prompt + a.new_tokens
    cache = max(seq, a.cache_len or 0)   # static cache slots (attention reads all of them)
    print(f"new tokens/s of token-by-token decoding ({a.prompt}-token prompt, {a.new_tokens} new tokens), "
          f"vocab {a.vocab}, static cache of {cache} slots, {device}, {a.threads} threads, "
          f"median of {a.repeats} interleaved runs")
    print("| family | d x L | B | dynamic (compacting) tok/s | static eager | static compiled | "
          "compile s | max abs diff of logits |")
    print("|---|---|---|---|---|---|---|---|")
    for family in a.families:
        for shape in a.shapes:
            hidden, layers = (int(x) for x in shape.split("x"))
            torch.manual_seed(0)
            model = build_model(sized_config(family, hidden, layers, a.vocab, seq)).to(device).eval()
            g = torch.Generator().manual_seed(1)
            if family == "adaponderlm":   # untrained gates: tau sets how many tokens halt
                calibrate_tau(model, torch.randint(0, a.vocab, (8, seq), generator=g).to(device), a.halted)
            for b in a.batches:
                ids = torch.randint(0, a.vocab, (b, seq), generator=g).to(device)
                variants = {"dynamic": lambda: make_decoder(model),
                            "static": lambda: make_static_decoder(model, b, cache),
                            "compiled": lambda: make_static_decoder(model, b, cache, compile=True)}
                start = time.perf_counter()
                logits = {name: time_token_by_token(make, ids, a.prompt)[1] for name, make in variants.items()}
                compile_s = time.perf_counter() - start   # all three warm-ups; the compile dominates
                diff = max((logits[n] - logits["dynamic"]).abs().max().item() for n in ("static", "compiled"))
                same = all(torch.equal(logits[n].argmax(-1), logits["dynamic"].argmax(-1))
                           for n in ("static", "compiled"))
                assert diff < 1e-4 and same, f"{family} {shape} B={b}: decoders disagree ({diff:.1e})"
                times = {name: [] for name in variants}
                for _ in range(a.repeats):   # interleaved: load drifts hit every variant alike
                    for name, make in variants.items():
                        times[name].append(time_token_by_token(make, ids, a.prompt)[0])
                rate = {n: b * a.new_tokens / statistics.median(t) for n, t in times.items()}
                print(f"| {family} | {hidden} x {layers} | {b} | {rate['dynamic']:,.0f} | "
                      f"{rate['static'] / rate['dynamic']:.2f}x | {rate['compiled'] / rate['dynamic']:.2f}x | "
                      f"{compile_s:.0f} | {diff:.1e} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--static", action="store_true", help="static-shape decoder vs compacting (see above)")
    p.add_argument("--families", nargs="+", default=["vanilla", "adaponderlm"], help="--static")
    p.add_argument("--shapes", nargs="+", default=["128x2", "256x4"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--halted", type=float, default=0.5, help="forced halting (AdaPonderLM, --static)")
    p.add_argument("--cache-len", type=int, default=None, help="--static: cache slots (default: prompt + new)")
    p.add_argument("--device", default="cpu")
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
    if a.static:
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            return static_decode(a)
        with tempfile.TemporaryDirectory() as cache:   # Inductor's kernels: not left in /tmp
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            return static_decode(a)
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
