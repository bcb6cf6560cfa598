#!/usr/bin/env python
"""Host syncs (device -> host reads) per optimizer step of a step that logs nothing, per
family and layout, split into megaponder's and DeepSpeed's (tests/sync_count.py's
TorchFunctionMode; the torch optimizer's host-side step counters are not counted). Tiny
configs (tests/parallel_checks.py family_config: d=32, 2 layers, seq 8, micro-batch 2, 2
micro-batches per step); steps 2-4 of 4 (the first builds DeepSpeed's ZeRO-3 trace).

    .venv/bin/python benchmarks/bench_syncs.py [--world 1|2] [--families vanilla adaponderlm ...]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

LAYOUTS = {1: [("single_z0", 1, 1, 0, {}), ("single_z1", 1, 1, 1, {}),
               ("single_z0_compact", 1, 1, 0, {"train_compaction": True})],
           2: [("dp2_z0", 1, 1, 0, {}), ("dp2_z2", 1, 1, 2, {}), ("dp2_z3", 1, 1, 3, {}),
               ("tp2_z1", 2, 1, 1, {}), ("pp2_z1", 1, 2, 1, {})]}


def _count(rank, world, layouts, families):
    import torch
    from parallel_checks import family_config
    from sync_count import SyncCounter
    from megaponder.models import build_model
    from megaponder.train.engine import build_engine
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import build_topology, seed_everything
    from megaponder.train.guards import StopRequest
    out = {}
    stop = StopRequest()
    for name, tp, pp, zero, ponder in layouts:
        topo = build_topology(tp, pp, False)
        for family in families:
            if ponder.get("train_compaction") and family != "adaponderlm":
                continue
            seed_everything(1234, topo)
            cfg = family_config(family, tp, pp, zero, **ponder)
            torch.manual_seed(0)
            engine = build_engine(parallelize(build_model(cfg), cfg, topo), cfg, topo)
            g = torch.Generator().manual_seed(1)
            per_step = []
            for step in range(4):
                ids = torch.randint(0, 128, (2, 2, 8), generator=g)
                engine.step_count = step
                with SyncCounter() as counter:
                    engine.train_step([{"input_ids": ids[j], "targets": ids[j]} for j in range(2)])
                    stop.should_stop()
                per_step.append(counter.by_origin())
            steady = per_step[1:]
            out[(name, family)] = {k: max(s[k] for s in steady) for k in ("megaponder", "deepspeed")}
    stop.close()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, choices=(1, 2))
    p.add_argument("--families", nargs="+", default=["vanilla", "ponderlm", "adaponderlm", "ponderlm2",
                                                     "ponderlm3", "loop", "pause"])
    a = p.parse_args()
    from dist_utils import run_distributed
    res = run_distributed(_count, a.world, (LAYOUTS[a.world], a.families))[0]
    print("| layout | family | megaponder syncs/step | DeepSpeed syncs/step |")
    print("|---|---|---|---|")
    for (name, family), c in res.items():
        print(f"| {name} | {family} | {c['megaponder']} | {c['deepspeed']} |")


if __name__ == "__main__":
    main()
