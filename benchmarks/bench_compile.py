#!/usr/bin/env python
"""Whole-model compilation (``model.compile: whole``) per family: graph breaks, recompiles,
losses against eager and the CPU step time ratio.

For each family (tiny: d=64, 2 layers, vocab 512, seq 32, batch 4; AdaPonderLM dense and with
``ponder.train_compaction``):

* ``torch._dynamo.explain`` of one training forward: graphs, graph breaks and the first break
  reasons (which op, where);
* the model compiled whole in place (``nn.Module.compile``: forward by Dynamo, backward by AOT
  autograd) with ``--backend`` (default inductor), ``--steps`` forward+backward steps on
  fixed batches: recompiles after the first step (Dynamo's frame counter), the largest
  |loss - eager loss| over the steps, and the step time ratio compiled / eager (median over
  the steps after the first, eager and compiled interleaved in the same run; below 1: the
  compiled step is faster).

    .venv/bin/python benchmarks/bench_compile.py [--families vanilla adaponderlm ...]
        [--backend inductor|aot_eager] [--steps 4] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

FAMILIES = ["vanilla", "ponderlm", "adaponderlm", "adaponderlm+compaction", "ponderlm2", "ponderlm3",
            "loop", "pause"]


def _model(name):
    from megaponder.config import load_config
    from megaponder.models import build_model
    family, _, variant = name.partition("+")
    sets = [f"model.family={family}", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
            "model.vocab_size=512", "data.seq_length=32", "model.attention_backend=sdpa",
            "ponder.halting_warmup_end=0"]
    if family in ("ponderlm", "adaponderlm", "loop", "ponderlm2", "ponderlm3"):
        sets.append("ponder.steps=2")
    if family in ("ponderlm2", "ponderlm3"):
        sets.append("ponder.jacobi_passes=[2]")   # one count: a varying one is a new graph by design
    if family == "adaponderlm":
        sets += ["ponder.tau=0.45", "ponder.gate_bias_init=0.0"]   # some tokens halt
    if variant == "compaction":
        sets.append("ponder.train_compaction=true")
    cfg = load_config(None, sets, check_paths=False)
    torch.manual_seed(0)
    return build_model(cfg).train()


def _step(model, ids, step):
    if hasattr(model, "set_step"):
        model.set_step(step)
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def explain(name, ids):
    import torch._dynamo
    torch._dynamo.reset()
    model = _model(name)
    if hasattr(model, "set_step"):   # as the engine does before each step
        model.set_step(0)
    out = torch._dynamo.explain(lambda x: model(x[:, :-1], targets=x[:, 1:]).loss)(ids)
    reasons = []
    for r in out.break_reasons[:3]:
        frame = r.user_stack[-1] if r.user_stack else None
        where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}" if frame else "?"
        reasons.append(f"{r.reason.splitlines()[0][:90]} ({where})")
    return out.graph_count, out.graph_break_count, reasons


def compiled_run(name, ids, backend, steps):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    eager, compiled = _model(name), _model(name)
    compiled.compile(backend=backend)
    _step(eager, ids[0], 0)   # the eager model's first step too (allocator, kernel choice)
    start = time.perf_counter()
    _step(compiled, ids[0], 0)
    first_s = time.perf_counter() - start
    frames_after_first = counters["frames"]["ok"]
    diffs, t_eager, t_comp = [], [], []
    for step in range(1, steps + 1):
        batch = ids[step % len(ids)]
        t0 = time.perf_counter()
        a = _step(eager, batch, step)
        t1 = time.perf_counter()
        b = _step(compiled, batch, step)
        t2 = time.perf_counter()
        t_eager.append(t1 - t0)
        t_comp.append(t2 - t1)
        diffs.append(abs(a - b))
    recompiles = counters["frames"]["ok"] - frames_after_first
    return {"first_s": first_s, "recompiles": recompiles, "max_loss_diff": max(diffs),
            "ratio": statistics.median(t_comp) / statistics.median(t_eager),
            "eager_ms": 1e3 * statistics.median(t_eager)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=FAMILIES)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--explain-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 512, (4, 33), generator=g) for _ in range(2)]
    print(f"whole-model torch.compile, backend {a.backend}, CPU {a.threads} threads, "
          f"{os.getloadavg()[0]:.0f} load average at start")
    print("| family | graphs | graph breaks | first break reasons | recompiles after step 1 | "
          "max abs loss diff vs eager | compiled / eager step time | eager step ms | first step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.families:
        graphs, breaks, reasons = explain(name, ids[0])
        row = f"| {name} | {graphs} | {breaks} | {'; '.join(reasons) or '-'} |"
        if a.explain_only:
            print(row + " | | | | |", flush=True)
            continue
        with tempfile.TemporaryDirectory() as cache:   # Inductor's kernels: not left in /tmp
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            r = compiled_run(name, ids, a.backend, a.steps)
        print(row + f" {r['recompiles']} | {r['max_loss_diff']:.1e} | {r['ratio']:.2f} | {r['eager_ms']:.1f} | "
              f"{r['first_s']:.0f} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.0f}")


if __name__ == "__main__":
    main()
