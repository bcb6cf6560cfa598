"""Per-rank parameter bytes vs tp and pp for a recurrent (weight-shared) stack.

    .venv/bin/python benchmarks/bench_parallel_memory.py [--hidden 256 --layers 8 --vocab 8192]

Parallelizes the model for every (tp, pp) in {1,2,4}^2 on 'virtual' ranks (no processes:
the topology is filled in by hand and TP sharding only slices tensors), and prints the bytes
of the parameters rank (tp_rank=0, pp_rank=0 and pp_rank=last) holds. The stack part falls
as 1/(tp*pp); embedding and head fall as 1/tp and are replicated over pp, or fall as
1/(tp*pp) with parallel.shard_vocab_over_pp (see docs/parallelism.md).
"""
import argparse
import copy

import torch

from megaponder.config import Config, ModelConfig
from megaponder.models import build_model
from megaponder.parallel import parallelize
from megaponder.parallel.state import Topology


class _FakeGroup:
    def __init__(self, size):
        self.size = size


def per_rank_bytes(model, cfg, tp, pp, pp_rank):
    import megaponder.parallel.tensor as T
    tp_group = _FakeGroup(tp) if tp > 1 else None
    mp_group = _FakeGroup(tp * pp) if tp * pp > 1 else None
    topo = Topology(world_size=tp * pp, tp=tp, pp=pp, tp_rank=0, pp_rank=pp_rank,
                    tp_group=tp_group, mp_group=mp_group, pp_group=None,
                    pp_ranks=list(range(pp)))
    size, rank = T._size, T._rank
    T._size = lambda g: 1 if g is None else g.size
    T._rank = lambda g: 0
    try:
        m = parallelize(copy.deepcopy(model), cfg, topo)
    finally:
        T._size, T._rank = size, rank
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    stack = sum(p.numel() * p.element_size() for p in m.stack.parameters())
    return total, stack


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    a = ap.parse_args()
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                            num_heads=a.heads, make_vocab_size_divisible_by=128)
    torch.manual_seed(0)
    model = build_model(cfg)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: d={a.hidden} L={a.layers} vocab={cfg.model.padded_vocab()} "
          f"params={full / 4 / 1e6:.2f}M ({full / 2**20:.1f} MiB fp32)\n")
    print("| tp | pp | rank bytes (MiB) | / single | with shard_vocab_over_pp | stack bytes (MiB) "
          "| stack / single |")
    print("|---|---|---|---|---|---|---|")
    base_stack = None
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            row = {}
            for over_pp in (False, True):
                cfg.parallel.shard_vocab_over_pp = over_pp
                first, last = (per_rank_bytes(model, cfg, tp, pp, r) for r in (0, pp - 1))
                row[over_pp] = (max(first[0], last[0]), max(first[1], last[1]))
            (total, stack), (total_over_pp, _) = row[False], row[True]
            base_stack = base_stack or stack
            print(f"| {tp} | {pp} | {total / 2**20:.2f} | {total / full:.3f} | "
                  f"{total_over_pp / full:.3f} | {stack / 2**20:.2f} | {stack / base_stack:.3f} |")


if __name__ == "__main__":
    main()
