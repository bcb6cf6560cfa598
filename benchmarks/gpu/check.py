#!/usr/bin/env python
"""The one prepared GPU run: attention kernels vs eager, bf16 training throughput with MFU and
peak memory through the DeepSpeed engine, and AdaPonderLM decode speed-up vs its ideal.

    bash benchmarks/gpu/run.sh                              # on the GPU machine (< 8 min)
    python benchmarks/gpu/check.py --device cpu --quick     # the same code, tiny, on CPU

Writes ``check.json`` (every number) and ``check.md`` (the tables for BENCHMARKS.md) into
``--out``. Exits non-zero if a check fails (a kernel off eager, a loss that does not fall).
Parts that would run past ``--budget-s`` are skipped and marked so, so a short loan always
comes back with the finished parts.

1. Attention: every available backend (eager, sdpa, flex, flash, auto) x masks (causal,
   documents, PonderLM-3 key bias, AdaPonderLM compacted queries) x (fp32, bf16): output and
   q/k/v (and key-bias) gradients vs eager in fp32 (max abs error) and the forward+backward time. Tolerance:
   bf16 keeps 8 mantissa bits, so a kernel may be at most 2x eager-bf16's own error off the
   fp32 truth plus 2^-9 (a wrong mask is off by O(1)); fp32: 1e-3 (TF32-free kernels differ
   by ~1e-6, flex's online softmax by ~1e-5 at T=1024).
2. Training: vanilla and AdaPonderLM at the Pythia-160M and 410M shapes (seq 2048, Pythia's
   50k vocabulary), bf16, DeepSpeed engine (ZeRO-1, one process), attention ``auto``, fused
   AdamW; variants of the levers (chunked vocabulary ops, compiled layers) on 160M. Tokens/s
   after warm-up, MFU (megaponder/models/flops.py FLOPs per token / ``--peak-tflops``), peak
   allocated memory, first/last loss on one repeated batch (must fall).
3. Decode: AdaPonderLM's batched KV-cached decoder with halting forced (tau calibrated on
   the dense forward) so that 10% / 50% / 90% of the pondering slots halt, vs the same model
   with no halting (tau = 0), interleaved: a prefill (one feed) and token-by-token decoding
   (a prompt, then tokens fed one at a time: the generation step, timed alone); speed-up =
   time ratio, ideal = 1 / the fraction of (pass, token) slots the decoder found active on
   those tokens (benchmarks/bench_decode.py's definition); the staggered decoder
   (megaponder/models/staggered.py) on the same tokens against the same no-halting baseline.
4. Static decode: vanilla and AdaPonderLM (50% halted) at the Pythia-70M shape, batch 1 and
   8, token by token: the static-shape decoder eager and compiled (CUDA graphs) vs the
   compacting decoder (tokens/s, warm-up = compile + capture, agreement). Last, so a short
   loan skips it first; ``--parts static_decode`` runs it alone (about 4 compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))   # benchmarks/_configs.py
sys.path.insert(0, os.path.join(ROOT, "tests"))   # tests/sync_count.py

import torch  # noqa: E402

from megaponder.models.attention import AttentionSpec, attention, available_backends  # noqa: E402
from megaponder.models.kernels import AUTO_CHOICES  # noqa: E402  (registers flex, flash and auto)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, repeats=3):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. attention ---------------------------------------------------------------------------
def attention_cases(device, quick):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, t, d = (2, 2, 64, 32) if quick else (4, 12, 2048, 64)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(device) for _ in range(3))
    # three documents per row, of different lengths per row
    seg = torch.zeros(b, t, dtype=torch.long)
    for r in range(b):
        cuts = sorted(torch.randperm(t - 2, generator=g)[:2].add(1).tolist())
        seg[r, cuts[0]:] = 1
        seg[r, cuts[1]:] = 2
    # requires grad, as PonderLM-3's router output does: flex must backpropagate into it
    bias = torch.log(torch.rand(b, 1, 1, t, generator=g) * 0.9 + 0.1).to(device).requires_grad_()
    n_active = t // 2   # AdaPonderLM at 50% halting: active rows are queries, keys every token
    rows = torch.stack([torch.sort(torch.randperm(t, generator=g)[:n_active]).values for _ in range(b)])
    q_rows = torch.stack([q[r, :, rows[r].to(device)] for r in range(b)])
    return {
        "causal": (q, AttentionSpec()),
        "documents": (q, AttentionSpec(segment_ids=seg.to(device))),
        "key_bias": (q, AttentionSpec(key_bias=bias)),
        "compacted_queries": (q_rows, AttentionSpec(q_index=rows.to(device))),
    }, k, v


def check_attention(device, quick, budget, results) -> list:
    cases, k, v = attention_cases(device, quick)
    rows, failures = [], []
    cpu = device.type == "cpu"
    for mask, (q, spec) in cases.items():
        grad_out = torch.randn_like(q)

        def run(backend, dtype, backward):
            qq, kk, vv = (x.detach().to(dtype).requires_grad_(backward) for x in (q, k, v))
            out = attention(qq, kk, vv, spec, backend=backend)
            extra = (spec.key_bias,) if spec.key_bias is not None and spec.key_bias.requires_grad else ()
            grads = torch.autograd.grad(out, (qq, kk, vv) + extra, grad_out.to(dtype)) if backward else None
            return out, grads

        truth, truth_g = run("eager", torch.float32, True)
        eager_bf, eager_bf_g = run("eager", torch.bfloat16, True)
        err = {"out": (eager_bf.float() - truth).abs().max().item(),
               "grad": max((a.float() - b).abs().max().item() for a, b in zip(eager_bf_g, truth_g))}
        for backend in available_backends():
            for dtype in (torch.float32, torch.bfloat16):
                if budget.left() < 0:
                    rows.append({"mask": mask, "backend": backend, "dtype": str(dtype)[6:], "skipped": "time"})
                    continue
                if backend == "flash" and (dtype == torch.float32 or not device.type == "cuda"):
                    continue
                if cpu and backend == "flex":
                    # forward-only on CPU and a C++ compile per shape (minutes on 2 busy cores):
                    # tests/test_attention.py checks it there; this run is for the GPU
                    continue
                backward = True
                row = {"mask": mask, "backend": backend, "dtype": str(dtype)[6:]}
                try:
                    out, grads = run(backend, dtype, backward)
                    row["err_out"] = (out.float() - truth).abs().max().item()
                    row["err_grad"] = (max((a.float() - b).abs().max().item() for a, b in zip(grads, truth_g))
                                       if backward else None)
                    row["ms"] = 1e3 * _median_time(lambda: run(backend, dtype, backward), device,
                                                   repeats=1 if quick else 5)
                    if dtype == torch.bfloat16:
                        tol_out, tol_grad = 2 * err["out"] + 2 ** -9, 2 * err["grad"] + 2 ** -9 * max(
                            x.abs().max().item() for x in truth_g)
                    else:
                        tol_out, tol_grad = 1e-3, 4e-3
                    row["ok"] = row["err_out"] <= tol_out and (not backward or row["err_grad"] <= tol_grad)
                except Exception as exc:  # noqa: BLE001 - a backend that fails is a finding
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                rows.append(row)
                if not row["ok"]:
                    failures.append(f"attention {backend}/{row['dtype']}/{mask}: {row.get('error', row)}")
    results["attention"] = {"shape": list(k.shape), "rows": rows,
                            "auto_choices": {"/".join(key): name for key, name in AUTO_CHOICES.items()}}
    return failures


# -- 2. training ------------------------------------------------------------------------------
def training_variants(quick, device):
    """(name, family, size, extra overrides). The levers are measured on 160M vanilla and
    AdaPonderLM; 410M runs the recommended setting."""
    # the recipes compile by default now: the base rows measure eager layers, "+compile" the lever
    base = ["optim.fused=true", "model.compile=false"]
    if quick:
        return [("vanilla", "vanilla", "tiny", base),
                ("adaponderlm", "adaponderlm", "tiny", base),
                ("adaponderlm +chunked", "adaponderlm", "tiny", base + ["model.loss_chunk_size=64"])]
    return [("vanilla", "vanilla", "160m", base),
            ("vanilla unfused adamw", "vanilla", "160m", ["optim.fused=false", "model.compile=false"]),
            ("vanilla +chunked", "vanilla", "160m", base + ["model.loss_chunk_size=4096"]),
            ("adaponderlm", "adaponderlm", "160m", base),
            ("adaponderlm +chunked", "adaponderlm", "160m", base + ["model.loss_chunk_size=4096"]),
            # gates start open (nothing halts): this is compaction's overhead, not its saving
            ("adaponderlm +train_compaction", "adaponderlm", "160m", base + ["ponder.train_compaction=true"]),
            ("vanilla", "vanilla", "410m", base),
            ("adaponderlm", "adaponderlm", "410m", base + ["model.loss_chunk_size=4096"]),
            ("vanilla +compile", "vanilla", "160m", base + ["model.compile=true"]),
            ("adaponderlm +compile", "adaponderlm", "160m", base + ["model.compile=true",
                                                                    "model.loss_chunk_size=4096"])]


def _train_config(family, size, extra, device, micro_batch):
    from _configs import tiny_config_path
    from megaponder.config import load_config

    if size == "tiny":
        path, sets = tiny_config_path(family), ["data.seq_length=64"]
    else:
        path = os.path.join(ROOT, "examples", "configs", f"pythia-{size}-adaponderlm.yml")
        sets = [f"model.family={family}", "data.seq_length=2048"]
    precision = "bf16" if device.type == "cuda" else "fp32"
    return load_config(path, sets + [f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1",
                                     f"train.precision={precision}", "model.attention_backend=auto",
                                     "parallel.zero_stage=1", *extra], check_paths=False)


def train_one(family, size, extra, device, steps, micro_batch, peak_tflops, topo, plan_memory=False):
    from megaponder.models import build_model, flops
    from megaponder.parallel import parallelize
    from megaponder.train.engine import build_engine

    cfg = _train_config(family, size, extra, device, micro_batch)
    torch.manual_seed(0)
    model = build_model(cfg)
    per_token = flops.training_flops_per_token(model, cfg.data.seq_length)
    engine = build_engine(parallelize(model, cfg, topo), cfg, topo)
    g = torch.Generator().manual_seed(1)
    b, t = cfg.train.micro_batch_size, cfg.data.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (b, t + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, start, warm = [], None, 2 if steps > 3 else 1
    first_step_s = None
    syncs = []
    from sync_count import SyncCounter   # tests/sync_count.py
    for step in range(steps):
        if step == warm:   # after warm-up (allocator, kernel selection, compilation)
            _sync(device)
            start = time.perf_counter()
        t0 = time.perf_counter()
        with SyncCounter(keep_sites=True) as counter:   # host reads of a step that logs nothing
            stats = engine.train_step(batch)
        if step >= warm:
            syncs.append(counter.by_origin())
        if step == 0:
            _sync(device)
            first_step_s = time.perf_counter() - t0
        losses.append(stats["loss"])
    _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = (steps - warm) * b * t / seconds
    from megaponder.train.throughput import peak_memory_mb
    mem, kind = peak_memory_mb(device)
    row = {"family": family, "size": size, "precision": cfg.train.precision, "batch": b, "seq": t,
           "extra": extra, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "flops_per_token": per_token, "first_loss": losses[0], "last_loss": losses[-1],
           "tokens_per_s": tokens_per_s, "step_s": seconds / (steps - warm), "first_step_s": first_step_s,
           "mfu": per_token * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None,
           "mem_peak_mb": mem, "mem_kind": kind, "mean_iters": stats.get("mean_iters"),
           "syncs_megaponder": max(x["megaponder"] for x in syncs) if syncs else None,
           "syncs_deepspeed": max(x["deepspeed"] for x in syncs) if syncs else None}
    if plan_memory:   # megaponder plan's total for this rank (fake tensors, in a subprocess)
        row["plan_mb"] = _planned_mb(cfg)
    row["falls"] = losses[-1] < losses[0] - 0.05
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _planned_mb(cfg) -> float:
    """``megaponder plan``'s per-rank total (MiB) for this config, world size 1: computed in a
    subprocess, since the plan builds its own fake process group."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write(cfg.to_yaml())
    code = ("import sys; from megaponder.config import load_config; from megaponder.train.plan import plan; "
            "print(plan(load_config(sys.argv[1], check_paths=False), 1)[0].total / 2**20)")
    try:
        out = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True,
                             timeout=240, cwd=ROOT)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - a missing number, not a failed check
        return float("nan")
    finally:
        os.unlink(f.name)


def check_training(device, quick, steps, peak_tflops, budget, results) -> list:
    from megaponder.parallel import init_distributed

    topo = init_distributed(1, 1, backend="nccl" if device.type == "cuda" else "gloo", seed=0)
    failures, rows = [], []
    for name, family, size, extra in training_variants(quick, device):
        if budget.left() < (5 if quick else 45):
            rows.append({"name": name, "family": family, "size": size, "skipped": "time"})
            continue
        micro = 4 if quick else 8
        try:
            row = train_one(family, size, extra, device, steps, micro, peak_tflops, topo,
                            plan_memory=not rows)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            micro //= 2
            row = train_one(family, size, extra, device, steps, micro, peak_tflops, topo)
        except Exception as exc:  # noqa: BLE001
            row = {"family": family, "size": size, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                   "falls": False}
        row["name"] = name
        rows.append(row)
        print(f"  train {name} {size}: " + (f"{row['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in row
                                             else row.get("error", "")), flush=True)
        if not row.get("falls"):
            failures.append(f"training {name} {size}: {row.get('error') or 'loss did not fall'}")
    results["training"] = {"steps": steps, "peak_tflops": peak_tflops, "rows": rows}
    return failures


# -- 3. decode ---------------------------------------------------------------------------------
def check_decode(device, quick, budget, results) -> list:
    from _configs import calibrate_tau, sized_config, time_staggered, time_token_by_token
    from megaponder.models import build_model
    from megaponder.models.decoders import decode_logits, make_decoder

    if budget.left() < (5 if quick else 40):
        results["decode"] = {"skipped": "time"}
        return []
    if quick:
        cfg = sized_config("adaponderlm", 64, 2, 512, 64)
        b, prefill, prompt, tokens = 2, 64, 8, 16
    else:
        cfg = _train_config("adaponderlm", "160m", [], device, 8)
        b, prefill, prompt, tokens = 8, 1024, 32, 64
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, cfg.model.vocab_size, (b, prefill), generator=torch.Generator().manual_seed(1)).to(device)
    short = ids[:, :prompt + tokens]
    repeats = 1 if quick else 3

    def timed(tau, fn):
        model.ponder_cfg.tau = tau
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    def token_by_token():
        return time_token_by_token(lambda: make_decoder(model), short, prompt)[0]

    def staggered():   # the same tokens, every row at its own pass; the decode part timed alone
        return time_staggered(model, short, prompt)

    rows = []
    for frac in (0.1, 0.5, 0.9):
        tau, mean_iters = calibrate_tau(model, ids, frac, iters=12 if quick else 20)
        with torch.no_grad():
            pre_dec = decode_logits(model, ids, return_decoders=True)[1][0].decoder
            tok_dec = make_decoder(model)
            tok_dec.feed(short[:, :prompt])
            for j in range(prompt, short.shape[1]):
                tok_dec.feed(short[:, j:j + 1])
            active_prefill = pre_dec.executed().float().mean().item()
            active_tokens = tok_dec.executed()[:, :, prompt:].float().mean().item()
            t = {"prefill0": [], "prefill": [], "tokens0": [], "tokens": [], "staggered0": [], "staggered": []}
            for _ in range(repeats + 1):   # interleaved: no halting (tau 0) and halting alike
                t["prefill0"].append(timed(0.0, lambda: decode_logits(model, ids)))
                t["prefill"].append(timed(tau, lambda: decode_logits(model, ids)))
                t["tokens0"].append(timed(0.0, token_by_token))
                t["tokens"].append(timed(tau, token_by_token))
                t["staggered0"].append(timed(0.0, staggered))
                t["staggered"].append(timed(tau, staggered))
        t = {k: statistics.median(v[1:]) for k, v in t.items()}   # the first round: warm-up
        sp_prefill, sp_decode = t["prefill0"] / t["prefill"], t["tokens0"] / t["tokens"]
        rows.append({"halted": frac, "tau": tau, "mean_iters": mean_iters,
                     "active_prefill": active_prefill, "active_tokens": active_tokens,
                     "ideal": 1.0 / active_tokens, "no_halting_ms_per_token": 1e3 * t["tokens0"] / tokens,
                     "prefill_speedup": sp_prefill, "decode_speedup": sp_decode,
                     "prefill_vs_ideal": sp_prefill * active_prefill,
                     "decode_vs_ideal": sp_decode * active_tokens,
                     # the staggered decoder against the same baseline (lockstep, no halting)
                     "staggered_speedup": t["tokens0"] / t["staggered"],
                     "staggered_vs_ideal": t["tokens0"] / t["staggered"] * active_tokens,
                     "staggered_overhead": t["staggered0"] / t["tokens0"]})
    results["decode"] = {"batch": b, "prefill": prefill, "prompt": prompt, "decode_tokens": tokens, "rows": rows}
    return []


def check_static_decode(device, quick, budget, results) -> list:
    """Batched token-by-token decoding of vanilla and AdaPonderLM (halting forced to 50% of
    the pondering slots): the static-shape decoder, eager and with its compiled step (CUDA
    graphs: mode reduce-overhead) vs the compacting decoder, same model, sdpa attention (the
    static step's masked attention over the whole cache; CUDA graphs with sdpa are the
    well-trodden path). New tokens/s after a prompt, the compile + capture time, and how far
    the logits and greedy tokens of the static decoders are from the compacting decoder's
    (bf16 on CUDA: reassociation can flip a gate that sits at tau, so agreement is reported,
    and only a non-finite logit or < 90% equal tokens fails)."""
    from _configs import calibrate_tau, sized_config, time_token_by_token
    from megaponder.models.decoders import make_decoder
    from megaponder.models.static_cache import make_static_decoder
    from megaponder.models import build_model

    if quick:   # the CPU smoke test: Dynamo's capture only, not Inductor's C++ build (minutes)
        shape, batches, prompt, new, backend = dict(hidden=64, layers=2, vocab=512), (2,), 8, 6, "eager"
    else:       # the Pythia-70M shape: one compile per (family, batch) must fit the budget
        shape, batches, prompt, new = dict(hidden=512, layers=6, vocab=50304), (1, 8), 128, 64
        backend = "inductor"
    rows, failures = [], []
    for family in ("vanilla", "adaponderlm"):
        for b in batches:
            if budget.left() < (5 if quick else 90):
                rows.append({"family": family, "batch": b, "skipped": "time"})
                continue
            cfg = sized_config(family, shape["hidden"], shape["layers"], shape["vocab"], prompt + new)
            torch.manual_seed(0)
            model = build_model(cfg).to(device).eval()
            if device.type == "cuda":
                model = model.to(torch.bfloat16)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, shape["vocab"], (b, prompt + new), generator=g).to(device)
            row = {"family": family, "batch": b, "prompt": prompt, "new_tokens": new,
                   "d": shape["hidden"], "layers": shape["layers"]}
            if family == "adaponderlm":
                row["tau"], row["mean_iters"] = calibrate_tau(model, ids, 0.5, iters=12 if quick else 16)
            variants = {"dynamic": lambda: make_decoder(model),
                        "static": lambda: make_static_decoder(model, b, prompt + new),
                        "compiled": lambda: make_static_decoder(model, b, prompt + new, compile=True,
                                                                compile_backend=backend)}
            try:
                start = time.perf_counter()
                logits = {n: time_token_by_token(make, ids, prompt)[1].float() for n, make in variants.items()}
                row["warmup_s"] = time.perf_counter() - start   # the compile and capture dominate
                times = {n: [] for n in variants}
                for _ in range(1 if quick else 3):   # interleaved
                    for n, make in variants.items():
                        times[n].append(time_token_by_token(make, ids, prompt)[0])
                for n in variants:
                    row[f"{n}_tokens_per_s"] = b * new / statistics.median(times[n])
                    if n != "dynamic":
                        row[f"{n}_max_diff"] = (logits[n] - logits["dynamic"]).abs().max().item()
                        same = logits[n].argmax(-1) == logits["dynamic"].argmax(-1)
                        row[f"{n}_token_agree"] = same.float().mean().item()
                row["ok"] = all(torch.isfinite(x).all().item() for x in logits.values()) and min(
                    row["static_token_agree"], row["compiled_token_agree"]) >= 0.9
            except Exception as exc:  # noqa: BLE001 - a step that does not compile is a finding
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(row)
            print(f"  static decode {family} B={b}: " + (
                f"{row['static_tokens_per_s'] / row['dynamic_tokens_per_s']:.2f}x eager, "
                f"{row['compiled_tokens_per_s'] / row['dynamic_tokens_per_s']:.2f}x compiled"
                if "compiled_tokens_per_s" in row else row.get("error", "")), flush=True)
            if not row["ok"]:
                failures.append(f"static decode {family} B={b}: {row.get('error', row)}")
            del model
    graphs = " + CUDA graphs" if device.type == "cuda" else ""
    results["static_decode"] = {"compile_backend": backend + graphs, "rows": rows}
    return failures


# -- report -------------------------------------------------------------------------------------
def markdown(results) -> str:
    env = results["env"]
    lines = [f"device: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, "
             f"backends {', '.join(env['backends'])}", ""]
    att = results.get("attention")
    if att:
        lines += [f"Attention, q/k/v {att['shape']} (compacted: half the rows as queries); "
                  "errors vs eager fp32, time = forward+backward", "",
                  "| mask | backend | dtype | max err out | max err grads | ms | ok |", "|---|---|---|---|---|---|---|"]
        for r in att["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['mask']} | {r['backend']} | {r['dtype']} | skipped ({r['skipped']}) | | | |")
                continue
            eg = "-" if r.get("err_grad") is None else f"{r['err_grad']:.1e}"
            lines.append(f"| {r['mask']} | {r['backend']} | {r['dtype']} | {r.get('err_out', float('nan')):.1e} "
                         f"| {eg} | {r.get('ms', float('nan')):.2f} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')} |")
        lines.append("")
        lines.append("auto chose: " + ", ".join(f"{k} -> {v}" for k, v in att["auto_choices"].items()))
        lines.append("")
    tr = results.get("training")
    if tr:
        lines += [f"Training, DeepSpeed engine (ZeRO-1, 1 process), {tr['steps']} steps on one batch, "
                  f"MFU vs {tr['peak_tflops']} TFLOP/s", "",
                  "| run | size | precision | batch x seq | tokens/s | MFU | peak mem (MB) | plan (MB) | "
                  "syncs/step megaponder + DeepSpeed | step s | first step s | loss first -> last |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            if "tokens_per_s" not in r:
                lines.append(f"| {r['name']} | {r['size']} | {r.get('skipped') or r.get('error')} | | | | | | | | | |")
                continue
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            plan = f"{r['plan_mb']:,.0f}" if r.get("plan_mb") is not None else "-"
            lines.append(f"| {r['name']} | {r['size']} | {r['precision']} | {r['batch']} x {r['seq']} | "
                         f"{r['tokens_per_s']:,.0f} | {mfu} | {r['mem_peak_mb']:,.0f} ({r['mem_kind']}) | "
                         f"{plan} | {r.get('syncs_megaponder')} + {r.get('syncs_deepspeed')} | "
                         f"{r['step_s']:.3f} | {r['first_step_s']:.1f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
        lines.append("")
    dec = results.get("decode")
    if dec and "rows" in dec:
        lines += [f"AdaPonderLM batched decoder, batch {dec['batch']}: prefill of {dec['prefill']} tokens; "
                  f"token by token: {dec['prompt']}-token prompt, then {dec['decode_tokens']} tokens one at a "
                  f"time; halting forced vs no halting (tau 0); ideal = 1 / active (pass, token) slots", "",
                  "| halted pondering slots | active slots: prefill | token by token | prefill speed-up (/ideal) "
                  "| no halting ms/token | token-by-token speed-up (/ideal) | staggered speed-up (/ideal) "
                  "| staggered no halting / lockstep no halting |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in dec["rows"]:
            lines.append(f"| {r['halted']:.0%} | {r['active_prefill']:.2f} | {r['active_tokens']:.2f} | "
                         f"{r['prefill_speedup']:.2f} ({r['prefill_vs_ideal']:.2f}) | "
                         f"{r['no_halting_ms_per_token']:.2f} | "
                         f"{r['decode_speedup']:.2f} ({r['decode_vs_ideal']:.2f}) | "
                         f"{r['staggered_speedup']:.2f} ({r['staggered_vs_ideal']:.2f}) | "
                         f"{r['staggered_overhead']:.2f} |")
    elif dec:
        lines.append(f"decode: skipped ({dec.get('skipped')})")
    st = results.get("static_decode")
    if st:
        lines += ["", "Static-shape decoder (megaponder/models/static_cache.py) vs the compacting decoder, "
                  "token by token, AdaPonderLM with 50% of the pondering slots halted; compiled: "
                  f"{st['compile_backend']}", "",
                  "| family | d x L | batch | compacting tok/s | static eager | static compiled | "
                  "warm-up s | max diff (eager / compiled) | equal tokens |", "|---|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            if "compiled_tokens_per_s" not in r:
                lines.append(f"| {r['family']} | | {r['batch']} | {r.get('skipped') or r.get('error')} | | | | | |")
                continue
            dyn = r["dynamic_tokens_per_s"]
            lines.append(f"| {r['family']} | {r['d']} x {r['layers']} | {r['batch']} | {dyn:,.0f} | "
                         f"{r['static_tokens_per_s'] / dyn:.2f}x | {r['compiled_tokens_per_s'] / dyn:.2f}x | "
                         f"{r['warmup_s']:.0f} | {r['static_max_diff']:.1e} / {r['compiled_max_diff']:.1e} | "
                         f"{min(r['static_token_agree'], r['compiled_token_agree']):.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke test)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 10; quick 4)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device for MFU (default on CUDA: the datasheet "
                        "figure of the card, megaponder/train/accelerators.py)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip parts that would start after this")
    p.add_argument("--parts", default="attention,training,decode,static_decode")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu-out"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    budget = Budget(a.budget_s)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        from megaponder.train.accelerators import device_peak_tflops
        peak = device_peak_tflops(torch.device("cuda", 0), "bf16", a.peak_tflops) or 989.0
        name = torch.cuda.get_device_name(0)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        peak, name = a.peak_tflops, "cpu"
    results = {"env": {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "backends": available_backends(), "argv": sys.argv[1:]}}
    print(f"device: {name}, torch {torch.__version__}, backends {available_backends()}", flush=True)
    steps = a.steps or (4 if a.quick else 10)
    failures = []
    parts = a.parts.split(",")
    t0 = time.perf_counter()
    if "attention" in parts:
        failures += check_attention(device, a.quick, budget, results)
        print(f"attention done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "training" in parts:
        failures += check_training(device, a.quick, steps, peak, budget, results)
        print(f"training done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "decode" in parts:
        failures += check_decode(device, a.quick, budget, results)
        print(f"decode done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "static_decode" in parts:
        failures += check_static_decode(device, a.quick, budget, results)
        print(f"static decode done ({time.perf_counter() - t0:.0f} s)", flush=True)
    results["failures"] = failures
    results["wall_s"] = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = markdown(results)
    with open(os.path.join(a.out, "check.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
