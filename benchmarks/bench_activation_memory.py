#!/usr/bin/env python
"""Activation checkpointing: peak memory and step time of one training step, per granularity,
as ratios to ``none`` (no recompute) measured in the same run.

    .venv/bin/python benchmarks/bench_activation_memory.py [--families vanilla adaponderlm]
        [--hidden 256 --layers 8 --seq 512 --batch 4 --vocab 2048 --steps 3]

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def measure(family: str, granularity: str, args) -> dict:
    """One configuration, in this process: build, one measured step, then timed steps."""
    import torch

    from megaponder.config import load_config
    from megaponder.models import build_model
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import Topology

    torch.set_num_threads(args.threads)
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                 f"model.num_heads={args.hidden // 64}", f"model.vocab_size={args.vocab}",
                 f"model.max_position_embeddings={args.seq}", f"data.seq_length={args.seq}",
                 f"parallel.activation_checkpointing={granularity}", "model.attention_backend=sdpa"]
    name = "tiny.yml" if family == "vanilla" else f"tiny-{family}.yml"
    cfg = load_config(os.path.join(ROOT, "examples", "configs", name), overrides, check_paths=False)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg, Topology())
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
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "GRANULARITY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(*args.one, args)))
        return
    passthrough = sys.argv[1:]
    # glibc would serve freed tensors' memory from its heap and keep it mapped (its mmap
    # threshold rises after the first large free), so RSS would stay at an earlier high-water
    # mark; a fixed threshold maps every tensor >= 64 KiB on its own and unmaps it when freed,
    # so RSS follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    rows = []
    for family in args.families:
        for gran in GRANULARITIES:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                                   "--one", family, gran], capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{family}/{gran} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[-1][7:]))
    print(f"B={args.batch} T={args.seq} d={args.hidden} L={args.layers} V={args.vocab}, "
          f"{args.threads} threads; ratios to 'none' of the same family")
    print(f"{'family':<13} {'checkpointing':<13} {'activation peak':>16} {'mem ratio':>10} "
          f"{'step-time ratio':>16} {'loss':>9}")
    for r in rows:
        base = next(b for b in rows if b["family"] == r["family"] and b["granularity"] == "none")
        print(f"{r['family']:<13} {r['granularity']:<13} {r['activation_peak_bytes'] / 2**20:>13.0f} MiB "
              f"{r['activation_peak_bytes'] / base['activation_peak_bytes']:>10.2f} "
              f"{r['step_s'] / base['step_s']:>16.2f} {r['loss']:>9.4f}")


if __name__ == "__main__":
    main()
