#!/usr/bin/env python
"""Looped pipeline: forward + backward time per micro-batch at pp=2 for several
``parallel.pipeline_chunks``, as ratios to the unchunked schedule (chunks=1) and to one
process running the whole model, all measured in the same run.

    .venv/bin/python benchmarks/bench_pipeline_schedule.py [--families vanilla ponderlm]
        [--chunks 1 2 4 8] [--hidden 256 --layers 8 --seq 256 --batch 8 --repeats 5]
        [--shard-vocab-over-pp]

Two gloo processes with one thread each (the pipeline ranks), and the single-process
reference with one thread. Without chunking every stack call runs stage 0, then stage 1:
the two ranks never compute at once, so pp=2 costs about what one process costs. With c
chunks stage 0 starts chunk i+1 while stage 1 runs chunk i; the ideal per-call time falls to
(c + P - 1) / (c * P) of one process (0.625 at c=4, P=2), less what the smaller matmuls and
the extra messages cost. Needs at least 2 free cores to mean anything.
"""
import argparse
import os
import statistics
import sys
import time

from _configs import ROOT, sized_config  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)


def _config(family, args, chunks, pp):
    return sized_config(family, args.hidden, args.layers, args.vocab, args.seq, [
        f"parallel.pp={pp}", f"parallel.pipeline_chunks={chunks}",
        f"parallel.shard_vocab_over_pp={args.shard_vocab_over_pp}"])


def _time_steps(model, args):
    """Median seconds of forward + backward over ``repeats`` after one warm-up."""
    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    times = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        model(ids, targets=ids).loss.backward()
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _build(family, args, chunks, pp, topo):
    import torch
    from megaponder.models import build_model
    from megaponder.parallel.parallelize import parallelize
    cfg = _config(family, args, chunks, pp)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg, topo)
    if hasattr(model, "set_step"):
        model.set_step(10 ** 6)
    return model


def _rank_main(rank, port, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megaponder.parallel.state import build_topology
    topo = build_topology(1, 2)
    out = {}
    for family in args.families:
        for chunks in args.chunks:
            model = _build(family, args, chunks, 2, topo)
            dist.barrier()
            out[(family, chunks)] = _time_steps(model, args)
    queue.put((rank, out))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["vanilla", "ponderlm"])
    p.add_argument("--chunks", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shard-vocab-over-pp", action="store_true",
                   help="split the embedding and head over the pipeline ranks too")
    args = p.parse_args()
    if 1 not in args.chunks:
        args.chunks = [1] + args.chunks

    import socket

    import torch
    import torch.multiprocessing as mp
    from megaponder.parallel.state import Topology

    torch.set_num_threads(1)
    single = {f: _time_steps(_build(f, args, 1, 1, Topology()), args) for f in args.families}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    per_rank = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
        if proc.exitcode:
            sys.exit(f"a pipeline rank failed (exit code {proc.exitcode})")

    print(f"pp=2{' (shard_vocab_over_pp)' if args.shard_vocab_over_pp else ''}, B={args.batch} T={args.seq} d={args.hidden} L={args.layers} V={args.vocab}, "
          f"1 thread per process; time = slower rank's median forward+backward")
    print(f"{'family':<10} {'chunks':>6} {'/ chunks=1':>11} {'/ one process':>14} {'ideal':>7}")
    for family in args.families:
        base = max(per_rank[r][(family, 1)] for r in per_rank)
        for chunks in args.chunks:
            t = max(per_rank[r][(family, chunks)] for r in per_rank)
            c = min(chunks, args.batch)
            print(f"{family:<10} {chunks:>6} {t / base:>11.2f} {t / single[family]:>14.2f} "
                  f"{(c + 1) / (2 * c):>7.3f}")


if __name__ == "__main__":
    main()
