#!/usr/bin/env python
"""Activation checkpointing: peak memory and step time of one training step, per granularity,
as ratios to ``none`` (no recompute) measured in the same run.

    .venv/bin/python benchmarks/bench_activation_memory.py [--families vanilla adaponderlm]
        [--hidden 256 --layers 8 --seq 512 --batch 4 --vocab 2048 --steps 3]
        [--sequence-parallel]   # instead: per-rank peak at tp=2 without / with SP

Every (family, granularity) runs in a fresh subprocess, so the process's high-water mark
belongs to that configuration alone. After one warm-up step the RSS high-water mark is reset
(Linux ``/proc/self/clear_refs``); reported is the peak RSS of the next forward + backward
minus the RSS just before it (parameters, gradients, thread pools and kernel workspaces are
excluded, so the number is what the step holds at its peak: activations and the backward's
temporaries), and the median step time over the timed steps. The model is built from
examples/configs/tiny[-<family>].yml with the sizes overridden: a small vocabulary (2048) keeps
the head's logits from dominating, as at Pythia sizes where the layers' activations do.

What to expect: ``layer`` keeps one [B, T, d] input per layer per iteration, ``iteration``
one per iteration (plus one iteration's full activations while it is being recomputed);
the embedding/head/pondering-embedding activations outside the stack are kept in all modes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _configs import ROOT, sized_config  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)

GRANULARITIES = ("none", "layer", "iteration")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's RSS high-water mark (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(family: str, granularity: str, args, topo=None) -> dict:
    """One configuration, in this process: build, one measured step, then timed steps.
    ``granularity``: none / layer / iteration (activation checkpointing, one process), or
    tp2 / tp2+sp (this process is one of two tensor-parallel ranks, ``topo`` given)."""
    import torch

    from megaponder.models import build_model
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import Topology

    torch.set_num_threads(args.threads)
    if topo is None:
        extra = [f"parallel.activation_checkpointing={granularity}"]
    else:
        extra = [f"parallel.tp={topo.tp}", f"parallel.sequence_parallel={topo.sequence_parallel}"]
    cfg = sized_config(family, args.hidden, args.layers, args.vocab, args.seq, extra)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg, topo or Topology())
    model.train()
    if hasattr(model, "set_step"):
        model.set_step(10 ** 6)   # past every warm-up: gates and losses fully active
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    tgt = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step():
        model.zero_grad(set_to_none=False)
        out = model(ids, targets=tgt)
        out.loss.backward()
        return float(out.loss)

    step()   # warm-up: gradients, thread pools and kernel workspaces are allocated here
    _reset_peak_rss()
    before = _rss_bytes()
    loss = step()
    peak = _peak_rss_bytes()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"family": family, "granularity": granularity, "loss": loss,
            "activation_peak_bytes": max(peak - before, 0), "step_s": statistics.median(times)}


def _tp_rank(rank, port, family, variant, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megaponder.parallel.state import build_topology
    topo = build_topology(2, 1, variant == "tp2+sp")
    queue.put(measure(family, variant, args, topo))
    dist.destroy_process_group()


def measure_tensor_parallel(family: str, variant: str, args) -> dict:
    """Two tensor-parallel ranks (gloo, one thread each); the larger rank peak is reported."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, port, family, variant, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return max(results, key=lambda r: r["activation_peak_bytes"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["vanilla", "ponderlm", "adaponderlm"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the measured one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sequence-parallel", action="store_true",
                   help="instead: tp=2 without and with sequence parallelism (per-rank peak, "
                        "1 thread per rank; ratio to tp2 without SP)")
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "GRANULARITY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        family, variant = args.one
        result = (measure_tensor_parallel(family, variant, args) if variant.startswith("tp")
                  else measure(family, variant, args))
        print("RESULT " + json.dumps(result))
        return
    passthrough = sys.argv[1:]
    # glibc would serve freed tensors' memory from its heap and keep it mapped (its mmap
    # threshold rises after the first large free), so RSS would stay at an earlier high-water
    # mark; a fixed threshold maps every tensor >= 64 KiB on its own and unmaps it when freed,
    # so RSS follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    variants = ("tp2", "tp2+sp") if args.sequence_parallel else GRANULARITIES
    if args.sequence_parallel:
        args.threads = 1
        passthrough = [a for a in passthrough if a != "--sequence-parallel"] + ["--threads", "1"]
    rows = []
    for family in args.families:
        for gran in variants:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                                   "--one", family, gran], capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{family}/{gran} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[-1][7:]))
    print(f"B={args.batch} T={args.seq} d={args.hidden} L={args.layers} V={args.vocab}, "
          f"{args.threads} thread(s) per process; ratios to '{variants[0]}' of the same family")
    print(f"{'family':<13} {'variant':<13} {'activation peak':>16} {'mem ratio':>10} "
          f"{'step-time ratio':>16} {'loss':>9}")
    for r in rows:
        base = next(b for b in rows if b["family"] == r["family"] and b["granularity"] == variants[0])
        print(f"{r['family']:<13} {r['granularity']:<13} {r['activation_peak_bytes'] / 2**20:>13.0f} MiB "
              f"{r['activation_peak_bytes'] / base['activation_peak_bytes']:>10.2f} "
              f"{r['step_s'] / base['step_s']:>16.2f} {r['loss']:>9.4f}")


if __name__ == "__main__":
    main()
