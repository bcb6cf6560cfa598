"""Bytes communicated per optimizer step for tp, sp, pp and dp (ZeRO 0-3), measured vs analytic.

    .venv/bin/python benchmarks/bench_comm_volume.py            # 2 gloo processes on CPU

Measurement: every torch.distributed collective and send is wrapped (megaponder's own TP/PP
collectives and DeepSpeed's ZeRO traffic alike) for one optimizer step after a warm-up step.
Convention (Megatron's way of counting "4 all-reduces of b*s*h per layer"): the *payload* of
each collective call is counted once (not once per participant): all-reduce and broadcast
their buffer, reduce-scatter its full input, all-gather its full output; a send its tensor.
The ring wire bytes per process follow from the payload: all-reduce 2(N-1)/N, reduce-scatter
and all-gather (N-1)/N, broadcast/send 1x. Traffic is attributed to the process group
(tp/pp/dp) it ran on; scalar traffic (gradient-norm and metric reductions) lands in "small".

Analytic (per micro-batch, b=micro batch, s=seq, h=hidden, L=layers, n=stack passes per
forward: 1 for vanilla, K+1 for ponderlm; 4 bytes in fp32):
  TP   layers 4nL*bsh (2 fwd all-reduces: attn.out, fc2; 2 bwd: qkv and fc1 input) -- Megatron;
       + embedding fwd bsh + head-input bwd n*bsh + vocab-parallel CE 3bs
       + pondering embedding (n-1)*(bs + bs(h+1))
  SP   layers 10nL*bsh (all-gather/reduce-scatter pairs, half the wire bytes of an all-reduce
       each, plus the backward re-gather of the qkv and fc1 inputs, which are not stored)
       + embedding 2bsh + head 3n*bsh (its input is re-gathered in the backward too) + CE 3bs + pondering emb (n-1)(bs + 2bs(h+1))
       + TP-replicated grads (LayerNorms, row biases, final norm) (6hL + 2h).
       Pondering families shard inside the stack only: the layers' 10nL*bsh, the stack output's
       all-gather and the input's backward all-gather 2n*bsh, the embedding and head as TP
       (bsh + n*bsh), CE 3bs, pondering embedding (n-1)(bs + bs(h+1)), stack grads 6hL + 2h
  PP   looped pipeline: per stack call (P-1) sends + 1 broadcast forward, the same backward:
       2nP*bsh; Megatron's interleaved pipeline with nP virtual stages sends 2(nP-1)*bsh
  DP   ZeRO-0 all-reduce of the gradients: Psi (=params*4 bytes) per step;
       ZeRO-1/2 reduce-scatter grads + all-gather params: 2 Psi (same wire bytes as ZeRO-0);
       ZeRO-3 all-gather params fwd + bwd + reduce-scatter grads: 3 Psi
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from collections import defaultdict

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LAYOUTS = [  # name, tp, pp, zero, sequence_parallel
    ("tp2", 2, 1, 0, False), ("tp2+sp", 2, 1, 0, True), ("pp2", 1, 2, 1, False),
    ("dp2 z0", 1, 1, 0, False), ("dp2 z1", 1, 1, 1, False), ("dp2 z2", 1, 1, 2, False),
    ("dp2 z3", 1, 1, 3, False),
]
FAMILIES = [("vanilla", 0), ("ponderlm", 3)]


def _config(family, steps, tp, pp, zero, sp, a):
    from megaponder.config import Config, ModelConfig
    cfg = Config()
    cfg.model = ModelConfig(family=family, vocab_size=a.vocab, hidden_size=a.hidden,
                            num_layers=a.layers, num_heads=4, max_position_embeddings=256)
    cfg.ponder.steps = steps
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, zero
    cfg.parallel.sequence_parallel = sp
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = a.batch, 1
    return cfg


_KINDS = {  # function name -> (index of the payload tensor arg / kwarg name, kind)
    "all_reduce": "all_reduce", "broadcast": "broadcast", "reduce": "reduce",
    "all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather",
    "all_gather": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter", "reduce_scatter": "reduce_scatter",
    "send": "send", "isend": "send",
}


class Counter:
    def __init__(self, topo):
        self.topo, self.on = topo, False
        self.bytes = defaultdict(int)

    def label(self, group):
        import torch.distributed as dist
        t = self.topo
        for name in ("tp", "pp", "dp", "mp"):
            g = getattr(t, f"{name}_group")
            if group is g or (group is None and getattr(t, name if name != "mp" else "tp") == t.world_size
                              and name != "mp"):
                return name
        return "world" if group is None or dist.get_world_size(group) == t.world_size else "other"

    def install(self):
        import torch.distributed as dist
        for fname, kind in _KINDS.items():
            orig = getattr(dist, fname)

            def wrapped(*args, _orig=orig, _kind=kind, **kw):
                if self.on:
                    self.record(_kind, args, kw)
                return _orig(*args, **kw)
            setattr(dist, fname, wrapped)
        # DeepSpeed's comm backend keeps its own references to these two (ZeRO traffic)
        from deepspeed.comm import comm as dscomm
        cdb = dscomm.cdb
        self._saved = {}
        for attr, kind in (("all_gather_function", "all_gather"),
                           ("reduce_scatter_function", "reduce_scatter")):
            orig = getattr(cdb, attr, None)
            if orig is None:
                continue
            self._saved[attr] = orig

            def wrapped(*args, _orig=orig, _kind=kind, **kw):
                if self.on:
                    self.record(_kind, args, kw)
                return _orig(*args, **kw)
            setattr(cdb, attr, wrapped)

    def uninstall(self):
        import torch.distributed as dist
        from deepspeed.comm import comm as dscomm
        for fname in _KINDS:
            setattr(dist, fname, getattr(dist.distributed_c10d, fname))
        for attr, orig in self._saved.items():
            setattr(dscomm.cdb, attr, orig)

    def record(self, kind, args, kw):
        import torch.distributed as dist
        group = kw.get("group")
        if kind == "send":
            t = args[0] if args else kw["tensor"]
            self.bytes[("pp" if self.topo.pp > 1 else "world", kind)] += t.numel() * t.element_size()
            return
        if group is None:
            pos = {"all_reduce": 2, "broadcast": 2, "reduce": 3, "all_gather": 2,
                   "reduce_scatter": 3}[kind]
            group = args[pos] if len(args) > pos else None
        if dist.get_world_size(group) == 1 or dist.get_rank(group) != 0:
            return   # no traffic in a 1-member group; count each collective call once
        if kind == "all_gather":
            out = args[0] if args else kw.get("output_tensor", kw.get("tensor_list"))
            n = sum(x.numel() * x.element_size() for x in out) if isinstance(out, list) \
                else out.numel() * out.element_size()
        elif kind == "reduce_scatter":
            inp = args[1] if len(args) > 1 else kw.get("input", kw.get("input_list"))
            n = sum(x.numel() * x.element_size() for x in inp) if isinstance(inp, list) \
                else inp.numel() * inp.element_size()
        else:
            t = args[0] if args else kw["tensor"]
            n = t.numel() * t.element_size()
        lab = self.label(group)
        self.bytes[(lab if n > 4096 else "small", kind)] += n


def analytic(family, name, tp, pp, zero, sp, n, a, params):
    b, s, h, L = a.batch, a.seq, a.hidden, a.layers
    bsh, bs, f = b * s * h, b * s, 4
    if name.startswith("dp"):
        return {"Megatron": None, "full": {0: 1, 1: 2, 2: 2, 3: 3}[zero] * params * f}
    if pp > 1:
        return {"Megatron": 2 * (n * pp - 1) * bsh * f, "full": 2 * n * pp * bsh * f}
    if sp and family != "vanilla":   # SP inside the stack; embedding and head as plain TP
        layers = 10 * n * L * bsh
        full = (layers + 2 * n * bsh + bsh + n * bsh + 3 * bs + (n - 1) * (bs + bs * (h + 1))
                + 6 * h * L + 2 * h)
        return {"Megatron": layers * f, "full": full * f}
    if sp:
        layers = 10 * n * L * bsh
        full = layers + 2 * bsh + 3 * n * bsh + 3 * bs + (n - 1) * (bs + 2 * bs * (h + 1)) + 6 * h * L + 2 * h
        return {"Megatron": layers * f, "full": full * f}
    layers = 4 * n * L * bsh
    full = layers + bsh + n * bsh + 3 * bs + (n - 1) * (bs + bs * (h + 1))
    return {"Megatron": layers * f, "full": full * f}


def _worker(rank, world, port, a, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    from megaponder.models import build_model
    from megaponder.parallel import parallelize
    from megaponder.train.engine import build_engine
    from megaponder.parallel.state import build_topology, seed_everything
    rows = []
    for family, steps in FAMILIES:
        for name, tp, pp, zero, sp in LAYOUTS:
            topo = build_topology(tp, pp, sp)
            seed_everything(0, topo)
            cfg = _config(family, steps, tp, pp, zero, sp, a)
            torch.manual_seed(0)
            model = build_model(cfg)
            params = sum(p.numel() for p in model.parameters())
            n = getattr(model, "num_passes", 1)
            model = parallelize(model, cfg, topo)
            engine = build_engine(model, cfg, topo)
            g = torch.Generator().manual_seed(topo.dp_rank)
            batch = {"input_ids": torch.randint(0, a.vocab, (a.batch, a.seq), generator=g),
                     "targets": torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)}
            counter = Counter(topo)
            counter.install()
            engine.train_step(batch)            # warm-up (ZeRO-3 traces its first step)
            counter.on = True
            engine.train_step(batch)
            counter.on = False
            counter.uninstall()   # restore the real functions before summing the counters
            gathered = [None] * world
            dist.all_gather_object(gathered, dict(counter.bytes))
            total = defaultdict(int)
            for d in gathered:
                for k, v in d.items():
                    total[k] += v
            rows.append((family, name, tp, pp, zero, sp, n, params, dict(total)))
            del engine, model
    queue.put((rank, rows))
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, 2, port, a, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    print(f"model d={a.hidden} L={a.layers} vocab={a.vocab} b={a.batch} s={a.seq}, fp32, 2 processes, "
          f"1 optimizer step (1 micro-batch); payload MB (10^6 bytes), each collective counted once\n")
    print("| family | layout | group traffic (payload MB by kind) | measured MB | analytic MB "
          "| measured/analytic | Megatron-style MB | measured/Megatron | small (scalars) MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, name, tp, pp, zero, sp, n, params, total in res[0]:
        grp = "dp" if name.startswith("dp") else ("pp" if pp > 1 else "tp")
        big = {k: v for k, v in total.items() if k[0] in (grp, "world")}
        small = sum(v for k, v in total.items() if k[0] not in (grp, "world"))
        measured = sum(big.values())
        an = analytic(family, name, tp, pp, zero, sp, n, a, params)
        kinds = ", ".join(f"{k[1]} {v / 1e6:.3f}" for k, v in sorted(big.items()))
        meg = an["Megatron"]
        fam = family if family == "vanilla" else f"{family} (n={n})"
        print(f"| {fam} | {name} | {kinds} | {measured / 1e6:.3f} | {an['full'] / 1e6:.3f} | "
              f"{measured / an['full']:.3f} | {'-' if meg is None else f'{meg / 1e6:.3f}'} | "
              f"{'-' if meg is None else f'{measured / meg:.3f}'} | {small / 1e6:.4f} |")


if __name__ == "__main__":
    main()
