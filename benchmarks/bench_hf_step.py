#!/usr/bin/env python
"""The vanilla training step (forward + backward + AdamW) of megaponder against Hugging
Face's GPTNeoXForCausalLM on the same config and weights, side by side in one process
(round-robin rounds, median of time(megaponder) / time(HF)), and optionally what
``model.compile`` (regional, Inductor) gains on CPU.

    .venv/bin/python benchmarks/bench_hf_step.py [--hidden 256 --layers 4 --seq 256 --batch 4
        --vocab 8192 --rounds 7 --threads 2] [--compile]
"""
import argparse
import statistics
import sys
import time

from _configs import ROOT  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)

import torch  # noqa: E402


def main():
    import transformers

    from megaponder.config import ModelConfig
    from megaponder.convert.hf import hf_config_from_model_config, hf_to_megaponder
    from megaponder.models.base import CausalLM
    from megaponder.models.compile import compile_layers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time megaponder with model.compile")
    p.add_argument("--profile", action="store_true",
                   help="also print, per aten op, how often one step of each side calls it (a "
                        "load-independent check for extra copies/masks/reshapes on our side)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                      num_heads=a.hidden // 64, max_position_embeddings=a.seq, attention_backend="sdpa")
    torch.manual_seed(0)
    hf_cfg = hf_config_from_model_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).train()
    models = {"megaponder": CausalLM(cfg).train(), "hf": hf}
    models["megaponder"].load_state_dict(hf_to_megaponder(hf.state_dict(), cfg.num_layers))
    if a.compile:
        models["megaponder+compile"] = CausalLM(cfg).train()
        models["megaponder+compile"].load_state_dict(models["megaponder"].state_dict())
        compile_layers(models["megaponder+compile"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1))

    def step(name):
        m, opt = models[name], opts[name]
        opt.zero_grad(set_to_none=True)
        if name == "hf":
            loss = m(ids[:, :-1], labels=ids[:, :-1]).loss
        else:
            loss = m(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()

    for name in models:   # warm-up (and compilation)
        start = time.perf_counter()
        step(name)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if a.profile:
        print_op_counts(step, ["megaponder", "hf"])
    times = {k: [] for k in models}
    for r in range(a.rounds):
        # alternate the order every round (ABBA...) so a drift in the shared machine's load
        # does not always hit the same side first
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [m / h for m, h in zip(times["megaponder"], times["hf"])]
    print(f"d={a.hidden} L={a.layers} V={a.vocab} B={a.batch} T={a.seq}, fp32, sdpa both, "
          f"{a.threads} threads, {a.rounds} rounds")
    print(f"HF step / megaponder step (speed of megaponder relative to HF, median of per-round "
          f"ratios): {statistics.median(1 / r for r in ratios):.3f}  "
          f"(megaponder {med['megaponder']:.3f} s, HF {med['hf']:.3f} s)")
    if a.compile:
        gain = statistics.median(m / c for m, c in zip(times["megaponder"], times["megaponder+compile"]))
        print(f"model.compile on CPU: eager step / compiled step = {gain:.3f}")


def print_op_counts(step, names):
    """aten ops whose call count per step differs between the sides, and the totals."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(name)
        counts[name] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    a, b = names
    print(f"aten ops per step: {a} {sum(counts[a].values())}, {b} {sum(counts[b].values())}; "
          f"ops whose count differs ({a} / {b}):")
    for op in sorted(set(counts[a]) | set(counts[b])):
        ca, cb = counts[a].get(op, 0), counts[b].get(op, 0)
        if ca != cb:
            print(f"  {op:40s} {ca:5d} / {cb:5d}")


if __name__ == "__main__":
    main()
