#!/usr/bin/env python
"""The one prepared check for a GPU session: attention kernels against eager, bf16 training
steps through the real engine, and training throughput with MFU.

    python benchmarks/gpu_check.py                      # on a GPU machine (~3-5 min)
    python benchmarks/gpu_check.py --device cpu --quick  # the same code paths, tiny, on CPU

On the GPU machine install a CUDA torch and the extras first (``pip install -e .[gpu]``, see
docs/environment notes in README); tests/test_gpu_check.py keeps the CPU path working.

1. Attention: every available backend (eager, sdpa, flex, flash) in fp32 and bf16, plain
   causal and document masks, forward output and q/k/v gradients vs eager in fp32
   (max abs error; bf16 rounding makes ~1e-2 normal, a wrong mask gives O(1)).
2. Training: vanilla and adaponderlm at the pythia-160m recipe shape (``--quick``: tiny),
   DeepSpeed engine in one process, bf16 on GPU / fp32 on CPU, ``--steps`` steps on one
   repeated batch: the loss must fall, tokens/s after warm-up, and model FLOPs utilisation
   (megaponder/models/flops.py training FLOPs per token x tokens/s / ``--peak-tflops``).
Prints one table per part; exits non-zero if a check fails (wrong kernel, loss not falling).
"""
import argparse
import os
import sys
import time

from _configs import ROOT, tiny_config_path  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megaponder.models.attention import AttentionSpec, attention, available_backends  # noqa: E402

#: bf16 keeps 8 mantissa bits: errors around 1e-2 of O(1) outputs are rounding; a wrong mask or
#: kernel gives errors of the size of the outputs themselves
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2}


def _inputs(device, quick, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, t, d = (2, 2, 64, 32) if quick else (4, 8, 1024, 64)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(device) for _ in range(3))
    seg = torch.cat([torch.zeros(b, t // 3, dtype=torch.long), torch.ones(b, t - t // 3, dtype=torch.long)], 1)
    return q, k, v, seg.to(device)


def check_attention(device, quick) -> list:
    q, k, v, seg = _inputs(device, quick)
    grad_out = torch.randn_like(q)
    rows, failures = [], []
    for mask, spec in (("causal", AttentionSpec()), ("documents", AttentionSpec(segment_ids=seg))):
        ref = {}
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = attention(qq, kk, vv, spec, backend="eager")
        out.backward(grad_out)
        ref = (out.detach(), qq.grad, kk.grad, vv.grad)
        for backend in available_backends():
            for dtype in (torch.float32, torch.bfloat16):
                if backend == "flash" and (device.type != "cuda" or dtype == torch.float32 or mask != "causal"):
                    continue   # flash-attn: CUDA, half precision, plain causal only
                if device.type == "cpu" and dtype == torch.bfloat16 and backend == "flex":
                    continue
                backward = not (backend == "flex" and device.type == "cpu")   # no CPU flex backward
                try:
                    qq, kk, vv = (x.detach().clone().to(dtype).requires_grad_(backward) for x in (q, k, v))
                    start = time.perf_counter()
                    out = attention(qq, kk, vv, spec, backend=backend)
                    if backward:
                        out.backward(grad_out.to(dtype))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    err_out = (out.float() - ref[0]).abs().max().item()
                    err_grad = max((x.grad.float() - r).abs().max().item()
                                   for x, r in zip((qq, kk, vv), ref[1:])) if backward else float("nan")
                    ok = err_out <= TOLERANCE[dtype] and (not backward or err_grad <= 4 * TOLERANCE[dtype])
                    rows.append((mask, backend, str(dtype).split(".")[-1], err_out, err_grad, seconds, ok))
                    if not ok:
                        failures.append(f"attention {backend}/{dtype}/{mask}")
                except Exception as exc:  # noqa: BLE001 - a backend that fails is a finding
                    rows.append((mask, backend, str(dtype).split(".")[-1], float("nan"), float("nan"), 0.0, False))
                    failures.append(f"attention {backend}/{dtype}/{mask}: {type(exc).__name__}: {exc}")
    print("\n| mask | backend | dtype | max abs err out | max abs err grads | seconds (first call) | ok |")
    print("|---|---|---|---|---|---|---|")
    for mask, backend, dtype, eo, eg, sec, ok in rows:
        print(f"| {mask} | {backend} | {dtype} | {eo:.2e} | {eg:.2e} | {sec:.3f} | {'yes' if ok else 'NO'} |")
    return failures


def check_training(device, quick, steps, peak_tflops) -> list:
    from megaponder.config import load_config
    from megaponder.models import build_model, flops
    from megaponder.parallel import build_engine, init_distributed, parallelize

    topo = init_distributed(1, 1, backend="nccl" if device.type == "cuda" else "gloo", seed=0)
    failures, rows = [], []
    for family in ("vanilla", "adaponderlm"):
        if quick:
            path = tiny_config_path(family)
            extra = ["data.seq_length=64", "train.micro_batch_size=4"]
        else:
            path = os.path.join(ROOT, "examples", "configs", "pythia-160m-adaponderlm.yml")
            extra = [f"model.family={family}", "data.seq_length=2048", "train.micro_batch_size=8"]
        precision = "bf16" if device.type == "cuda" else "fp32"
        cfg = load_config(path, extra + ["train.grad_accum_steps=1", f"train.precision={precision}",
                                         "model.attention_backend=auto"], check_paths=False)
        torch.manual_seed(0)
        model = build_model(cfg)
        per_token = flops.training_flops_per_token(model, cfg.data.seq_length)
        engine = build_engine(parallelize(model, cfg, topo), cfg, topo)
        g = torch.Generator().manual_seed(1)
        b, t = cfg.train.micro_batch_size, cfg.data.seq_length
        ids = torch.randint(0, cfg.model.vocab_size, (b, t + 1), generator=g)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
        losses, start = [], None
        for step in range(steps):
            if step == 2:   # after warm-up (allocator, kernel selection, compilation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            losses.append(engine.train_step(batch)["loss"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens_per_s = (steps - 2) * b * t / seconds
        mfu = per_token * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else float("nan")
        falls = losses[-1] < 0.9 * losses[0]
        rows.append((family, precision, b, t, losses[0], losses[-1], tokens_per_s, mfu, falls))
        if not falls:
            failures.append(f"training {family}: loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
        del engine, model
    print(f"\n| family | precision | batch x seq | first loss | last loss ({steps} steps, one batch) "
          f"| tokens/s | MFU (peak {peak_tflops or '-'} TFLOP/s) |")
    print("|---|---|---|---|---|---|---|")
    for family, prec, b, t, l0, l1, tps, mfu, falls in rows:
        print(f"| {family} | {prec} | {b} x {t} | {l0:.3f} | {l1:.3f}{'' if falls else ' (NOT FALLING)'} "
              f"| {tps:,.0f} | {mfu:.3f} |")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke test)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device for MFU (H200/H100 SXM: 989)")
    p.add_argument("--skip-training", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        peak = a.peak_tflops or 989.0
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        peak = a.peak_tflops
        print(f"device: cpu, torch {torch.__version__}")
    print(f"attention backends available: {', '.join(available_backends())}")
    failures = check_attention(device, a.quick)
    if not a.skip_training:
        failures += check_training(device, a.quick, a.steps, peak)
    print("\nFAILED:\n  " + "\n  ".join(failures) if failures else "\nall checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
