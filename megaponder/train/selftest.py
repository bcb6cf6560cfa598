"""A tiny 2-step job that checks a launcher end to end:

    torchrun --nproc_per_node 2 -m megaponder.train.selftest --tp 2
    deepspeed --num_gpus 2 megaponder/train/selftest.py --tp 2
    mpirun --allow-run-as-root -np 2 --mca btl self,vader --mca oob_tcp_if_include lo \\
        -x MASTER_PORT=29511 python -m megaponder.train.selftest --tp 2
    srun python -m megaponder.train.selftest --tp 2        # inside examples/slurm/*.sbatch

Every rank prints one line ``SELFTEST {json}`` with its rank, world size, launcher source,
topology and losses; tensor-parallel ranks must report identical losses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file (deepspeed launcher): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    from megaponder.parallel.state import strip_local_rank_arg
    argv = strip_local_rank_arg(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from megaponder.config import Config, ModelConfig
    from megaponder.models import build_model
    from megaponder.parallel import init_distributed, launcher_env, parallelize
    from megaponder.train.engine import build_engine

    torch.set_num_threads(1)
    source = launcher_env().source
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=200, make_vocab_size_divisible_by=8, hidden_size=32,
                            num_layers=2, num_heads=4, max_position_embeddings=64)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = args.tp, args.pp, args.zero
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = 2, 1
    topo = init_distributed(args.tp, args.pp, backend="gloo", seed=cfg.train.seed)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg, topo)
    engine = build_engine(model, cfg, topo)
    g = torch.Generator().manual_seed(100 + topo.dp_rank)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(0, 200, (2, 8), generator=g)
        losses.append(engine.train_step({"input_ids": ids, "targets": ids.roll(-1, 1)})["loss"])
    print("SELFTEST " + json.dumps({"rank": topo.rank, "world": topo.world_size, "source": source,
                                    "topology": topo.describe(), "losses": losses}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
