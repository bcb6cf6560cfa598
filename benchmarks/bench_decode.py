#!/usr/bin/env python
"""AdaPonderLM inference: what halting saves in seconds, against the same model decoded with
no halting (``ponder.tau = 0``: every token runs every pass) in the same run.

Default mode: for each target fraction of active (pass, token) slots (``--active``; the gates
are untrained, so a calibrated ``ponder.tau`` sets how many tokens halt), the batched KV-cached
decoder (megaponder/models/decoders.py, all rows in lockstep) at that tau and at tau = 0, in

  * prefill: the whole ``--seq`` tokens in one feed (cross-row compaction), and
  * token by token: a ``--prompt``-token prompt in one feed, then ``--decode-seq`` tokens fed
    one at a time (the generation step; only this part is timed).

**Ideal speed-up** = 1 / (active fraction): the no-halting time scaled by the share of
(pass, token) slots that still had to be computed (measured on the same tokens, from what the
decoder executed). Reported: the measured speed-up (no-halting time / halting time: the
median over ``--repeats`` interleaved repeats of each repeat's ratio) and its fraction of the
ideal (1.0 = every skipped slot saved its full share of the time). The ideal assumes a pass over M of the B rows costs M/B of a
full one; on a CPU a one-token pass streams every weight whatever M is, so the benchmark also
times one pass (stack, head, pondering update; one token per row over a cache of the decoded
length) for every M = 1..B in the same run and reports the **row-cost bound**: the speed-up a
decoder that ran exactly the active rows of every pass (and skipped empty passes) would get at
those measured costs, and the measured speed-up's fraction of it. Also: the static-shape decoder (no compaction, eager) at tau = 0,
as a check that the no-halting baseline carries no overhead of its own.

**Staggered** columns: the same tokens decoded by the staggered decoder
(megaponder/models/staggered.py, every row at its own pass, one stack pass per tick), timed
against the same baseline (the lockstep decoder with no halting); "every gate" is its
speed-up with the gate policy of accelerators (every AdaPonderLM gate for every row, no host
read; CPU's default evaluates only the deciding rows' range of passes, ``gates_in_range``);
the last column is the staggered decoder's own cost with no halting over that baseline (its
overhead per pass: the gates, the per-row gather of each row's pass of the cache, the K/V
write into the later passes, the masked attention).
Last: the decoder ``generate_batch(decoder="auto")`` picks for these prompts (lockstep where
at least 0.8 of the prompt's slots were active, megaponder/models/staggered.py) and that
decoder's speed-up.

    .venv/bin/python benchmarks/bench_decode.py [--batch 8 --seq 128 --hidden 256 --layers 4]
        [--active 0.9 0.5 0.3] [--prompt 16 --decode-seq 48] [--repeats 5] [--threads 2]
        [--clock wall|cpu]

``--clock cpu`` times with this process's CPU time (time.process_time) instead of wall time:
on a shared, loaded machine it leaves out the time other processes held the cores (use it
with ``--threads 1``; caches and memory bandwidth are still shared).

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
from _configs import ROOT, calibrate_tau, sized_config, time_staggered, time_token_by_token  # noqa: E402

sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megaponder.models import build_model  # noqa: E402
from megaponder.models.decoders import decode_logits, make_decoder  # noqa: E402
from megaponder.models.staggered import StaggeredDecoder, choose_decoder  # noqa: E402
from megaponder.models.static_cache import make_static_decoder  # noqa: E402


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
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: 32 --static, 16 otherwise)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--halted", type=float, default=0.5, help="forced halting (AdaPonderLM, --static)")
    p.add_argument("--cache-len", type=int, default=None, help="--static: cache slots (default: prompt + new)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--decode-seq", type=int, default=48, help="tokens fed one at a time (default mode)")
    p.add_argument("--active", type=float, nargs="+", default=[0.9, 0.5, 0.3],
                   help="target fractions of active (pass, token) slots (default mode)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=None, help="default: 3 --static, 5 otherwise")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="default mode: see above")
    a = p.parse_args()
    CLOCK[0] = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    a.prompt = a.prompt or (32 if a.static else 16)
    a.repeats = a.repeats or (3 if a.static else 5)
    if a.static:
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            return static_decode(a)
        with tempfile.TemporaryDirectory() as cache:   # Inductor's kernels: not left in /tmp
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            return static_decode(a)
    return halting_speedups(a)


def halting_speedups(a):
    device = torch.device(a.device)
    cfg = sized_config("adaponderlm", a.hidden, a.layers, a.vocab, max(a.seq, a.prompt + a.decode_seq))
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    short = torch.randint(0, a.vocab, (a.batch, a.prompt + a.decode_seq), generator=g).to(device)
    k = model.num_passes - 1
    print(f"adaponderlm d={a.hidden} L={a.layers} passes={model.num_passes} V={a.vocab} B={a.batch}, {device}, "
          f"{a.threads} threads, {a.clock} clock; prefill T={a.seq}; token by token: {a.prompt}-token prompt + "
          f"{a.decode_seq} tokens one at a time; ratios: median of {a.repeats} interleaved repeats; "
          f"load average {os.getloadavg()[0]:.1f} at start")

    def with_tau(tau, fn):
        model.ponder_cfg.tau = tau
        return fn()

    def prefill():
        return decode_logits(model, ids, return_decoders=True)[1][0].decoder

    def tokens():
        return time_token_by_token(lambda: make_decoder(model), short, a.prompt, CLOCK[0])[0]

    def static_tokens():
        return time_token_by_token(lambda: make_static_decoder(model, a.batch, short.shape[1]), short, a.prompt,
                                   CLOCK[0])[0]

    def staggered_tokens(gates_in_range=None):   # the same tokens fed (teacher forcing)
        return time_staggered(model, short, a.prompt, CLOCK[0], gates_in_range)

    def active_of(decoder, start=0):
        return decoder.executed()[:, :, start:].float().mean().item()

    pass_s = _pass_times(model, a.batch, a.prompt + a.decode_seq // 2, a.repeats)
    print("one-token pass (stack + head + pondering update) over M of B rows, time / time of B rows: "
          + ", ".join(f"M={m_}: {pass_s[m_] / pass_s[a.batch]:.2f}" for m_ in sorted(pass_s)))
    print("| target active | tau | active slots: prefill | token by token | ideal speed-up (token by token) "
          "| prefill: speed-up | / ideal | token by token: ms per token, no halting | halting "
          "| speed-up | / ideal | row-cost bound | / bound | staggered: ms per token | speed-up | / ideal "
          "| every gate: speed-up "
          "| staggered no halting / lockstep no halting | generate_batch 'auto' picks | speed-up | / ideal |")
    print("|---" * 21 + "|")
    static_ms = []
    for target in a.active:
        halted = 1.0 - (target * (k + 1) - 1.0) / k   # of the pondering slots (passes 1..K)
        tau, _ = calibrate_tau(model, ids, halted)
        dec = make_decoder(model)
        with torch.no_grad():
            dec.feed(short[:, :a.prompt])
            for j in range(a.prompt, short.shape[1]):
                dec.feed(short[:, j:j + 1])
        act_tok = active_of(dec, a.prompt)
        rows = dec.executed()[:, :, a.prompt:].sum(1)   # [P, tokens]: active rows of each pass
        bound_time = sum(pass_s[int(r)] for r in rows.flatten() if r > 0)
        bound = rows.numel() * pass_s[a.batch] / bound_time
        act_pre = active_of(with_tau(tau, prefill))
        runs = {"pre0": lambda: with_tau(0.0, lambda: _timed(prefill)),
                "pre": lambda: with_tau(tau, lambda: _timed(prefill)),
                "tok0": lambda: with_tau(0.0, tokens), "tok": lambda: with_tau(tau, tokens),
                "static0": lambda: with_tau(0.0, static_tokens),
                "stag0": lambda: with_tau(0.0, staggered_tokens), "stag": lambda: with_tau(tau, staggered_tokens),
                "stag_every": lambda: with_tau(tau, lambda: staggered_tokens(False))}
        for fn in runs.values():   # warm-up
            fn()
        times = {name: [] for name in runs}
        for r in range(a.repeats):   # interleaved, the order reversed every other repeat:
            # load drifts hit every variant alike and no variant always follows the same one
            for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                times[name].append(fn())
        t = {name: statistics.median(v) for name, v in times.items()}
        static_ms.append(1e3 * t["static0"] / a.decode_seq)
        def ratio(num, den):   # the median of the repeats' ratios: a pair measured moments
            # apart shares the machine's state (on a shared machine the times drift by 10-20%)
            return statistics.median(x / y for x, y in zip(times[num], times[den]))

        sp_pre, sp_tok = ratio("pre0", "pre"), ratio("tok0", "tok")
        sp_stag = ratio("tok0", "stag")   # against the lockstep decoder without halting
        probe = StaggeredDecoder(model)   # what generate_batch(decoder="auto") would run here
        probe.prefill(short[:, :a.prompt], a.decode_seq)
        picked = choose_decoder(probe)
        sp_auto = sp_stag if picked == "staggered" else sp_tok
        print(f"| {target:.2f} | {tau:.4f} | {act_pre:.3f} | {act_tok:.3f} | {1 / act_tok:.2f} | "
              f"{sp_pre:.2f} | {sp_pre * act_pre:.2f} | {1e3 * t['tok0'] / a.decode_seq:.2f} | "
              f"{1e3 * t['tok'] / a.decode_seq:.2f} | {sp_tok:.2f} | {sp_tok * act_tok:.2f} | {bound:.2f} | "
              f"{sp_tok / bound:.2f} | {1e3 * t['stag'] / a.decode_seq:.2f} | {sp_stag:.2f} | "
              f"{sp_stag * act_tok:.2f} | {ratio('tok0', 'stag_every'):.2f} | {ratio('stag0', 'tok0'):.2f} | {picked} | {sp_auto:.2f} | "
              f"{sp_auto * act_tok:.2f} |", flush=True)
    print(f"static-shape decoder (eager, no halting), ms per token in the same runs: "
          f"{', '.join(f'{x:.2f}' for x in static_ms)}; load average {os.getloadavg()[0]:.1f} at the end")


def _pass_times(model, batch, cache_len, repeats, calls=10):
    """{M: seconds of one one-token pass over M rows} for M = 1..batch (medians of ``repeats``
    interleaved measurements of ``calls`` passes): the stack with every row's cache of
    ``cache_len`` keys, the head and the pondering update."""
    from megaponder.models.attention import AttentionSpec
    attn = model.stack.layers[0].attn
    heads = getattr(attn, "num_kv_heads", attn.num_heads)
    param = next(model.parameters())
    cache = torch.randn(batch, heads, cache_len, attn.head_dim, dtype=param.dtype, device=param.device)
    d = model.cfg.hidden_size

    def one_pass(m):
        x = torch.randn(m, 1, d, dtype=param.dtype, device=param.device)
        pos = torch.full((m, 1), cache_len, device=param.device)

        def hook(layer, k, v):
            return torch.cat([cache[:m], k], 2), torch.cat([cache[:m], v], 2)

        with torch.no_grad():
            hidden, _ = model.stack(x, pos, AttentionSpec(), kv_hook=hook)
            model.ponder_update(model.head(hidden))

    times = {m: [] for m in range(1, batch + 1)}
    for m in times:   # warm-up
        one_pass(m)
    for _ in range(repeats):
        for m in times:
            start = CLOCK[0]()
            for _ in range(calls):
                one_pass(m)
            times[m].append((CLOCK[0]() - start) / calls)
    return {m: statistics.median(v) for m, v in times.items()}


def _timed(fn):
    start = CLOCK[0]()
    fn()
    return CLOCK[0]() - start


#: the clock of the default mode (--clock)
CLOCK = [time.perf_counter]

if __name__ == "__main__":
    main()
