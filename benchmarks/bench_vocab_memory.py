#!/usr/bin/env python
"""What model.loss_chunk_size saves: the tensors autograd keeps for the backward (the
activation peak of a training step; parameters excluded; each storage counted once) and the
step time, plain vs chunked vocabulary ops, on Pythia's 50k vocabulary, for vanilla and
AdaPonderLM (K=3: three pondering passes each hold [tokens, vocab] logits and softmax).
Also checks the two give the same loss.

    .venv/bin/python benchmarks/bench_vocab_memory.py [--hidden 256 --layers 2 --seq 512
        --batch 2 --vocab 50304 --chunk 1024 --threads 2]
"""
import argparse
import sys
import time

from _configs import ROOT, sized_config  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megaponder.models import build_model  # noqa: E402
from megaponder.models.chunked import saved_activation_bytes  # noqa: E402


def measure(family, a, chunk):
    cfg = sized_config(family, a.hidden, a.layers, a.vocab, a.seq, [f"model.loss_chunk_size={chunk}"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(a.repeats + 1):
        start = time.perf_counter()
        out, saved = saved_activation_bytes(lambda: model(ids[:, :-1], targets=ids[:, 1:]),
                                            exclude=list(model.parameters()))
        out.loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return out.loss.item(), saved, sorted(times[1:])[len(times[1:]) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"d={a.hidden} L={a.layers} V={a.vocab} B={a.batch} T={a.seq}, chunk {a.chunk} tokens, "
          f"{a.threads} threads, fp32")
    print("| family | saved for backward, plain (MB) | chunked (MB) | ratio | step time chunked / plain | loss equal |")
    print("|---|---|---|---|---|---|")
    for family in ("vanilla", "adaponderlm"):
        loss0, saved0, t0 = measure(family, a, 0)
        loss1, saved1, t1 = measure(family, a, a.chunk)
        print(f"| {family} | {saved0 / 2**20:,.0f} | {saved1 / 2**20:,.0f} | {saved1 / saved0:.3f} | "
              f"{t1 / t0:.2f} | {abs(loss0 - loss1) < 1e-4} ({abs(loss0 - loss1):.1e}) |", flush=True)


if __name__ == "__main__":
    main()
