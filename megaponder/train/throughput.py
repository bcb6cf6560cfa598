"""Throughput, MFU and peak memory for the training log (metrics.jsonl and the progress bar).

* ``step_tokens_per_s``: tokens of every rank per second since the previous log line (the
  cumulative ``tokens_per_s`` of the loop includes the first steps' warm-up and compilation).
* ``mfu``: model FLOPs utilisation = model training FLOPs per token
  (megaponder/models/flops.py: 3x the dense forward, no activation recompute counted) x
  step_tokens_per_s / (processes x peak). The peak is ``train.peak_tflops`` when set, else the
  dense peak of the CUDA device at the training precision from megaponder/train/accelerators.py
  (H100/H200/A100/L40S/MI300X; bf16, or TF32 for fp32), so a GPU run logs MFU with no setting.
  Absent on CPU or an unknown device without ``train.peak_tflops``.
* ``mem_peak_mb``: the largest per-rank memory peak and ``mem_peak_mb_per_rank`` each rank's:
  CUDA's peak allocated bytes on a GPU, the process's peak resident set size on CPU (a
  different quantity: it includes the Python heap and libraries), named by ``mem_kind``
  (``cuda_allocated`` / ``cpu_rss``).
"""
from __future__ import annotations

import os
import resource
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB of this process since start, kind)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_rss"


class ThroughputMeter:
    def __init__(self, cfg, world_size: int, device: torch.device, tokens: int = 0):
        from ..models.flops import training_flops_per_token

        self.flops_per_token = training_flops_per_token(cfg=cfg.model, ponder=cfg.ponder,
                                                        seq_len=cfg.data.seq_length)
        from .accelerators import device_peak_tflops
        self.peak = device_peak_tflops(device, cfg.train.precision, cfg.train.peak_tflops)
        self.world_size, self.device = world_size, device
        self.mark(tokens)

    def mark(self, tokens: int) -> None:
        """Start a new interval (after a log line, an evaluation or a checkpoint)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0, self.tokens0 = time.perf_counter(), tokens

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        if not self.peak:
            return None
        return self.flops_per_token * tokens_per_s / (self.world_size * self.peak * 1e12)

    def record(self, tokens: int, group=None) -> dict:
        """The metrics of the interval since :meth:`mark` (the caller marks the next start,
        after any evaluation). Collective over ``group`` (every rank's memory peak is
        gathered) when torch.distributed is initialised."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rate = (tokens - self.tokens0) / seconds
        mine, kind = peak_memory_mb(self.device)
        per_rank = [mine]
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            from ..collectives import collective_device
            n, r = dist.get_world_size(group), dist.get_rank(group)
            buf = torch.zeros(n, dtype=torch.float64, device=collective_device())
            buf[r] = mine
            dist.all_reduce(buf, group=group)
            per_rank = buf.tolist()
        out = {"step_tokens_per_s": round(rate, 1), "mem_peak_mb": round(max(per_rank), 1),
               "mem_peak_mb_per_rank": [round(x, 1) for x in per_rank], "mem_kind": kind}
        mfu = self.mfu(rate)
        if mfu is not None:
            out["mfu"] = round(mfu, 5)
        return out

    @staticmethod
    def postfix(record: dict) -> dict:
        """The progress bar's share of a record."""
        post = {"mem": f"{record['mem_peak_mb'] / 1024:.1f}G"}
        if "mfu" in record:
            post["mfu"] = f"{100 * record['mfu']:.1f}%"
        return post


class StepProfiler:
    """``train.profile_steps: [first, last]``: torch.profiler around those optimizer steps
    (1-based, as in metrics.jsonl) on every rank: CPU (and CUDA) activity, tensor shapes and
    memory allocations, written when ``last`` ends to ``run_dir/profile/`` by
    ``torch.profiler.tensorboard_trace_handler`` (``rank<R>.<time>.pt.trace.json``: a Chrome
    trace that TensorBoard's profiler plugin, Perfetto and chrome://tracing open). Each
    profiled step is marked as ``ProfilerStep#N``."""

    def __init__(self, steps, run_dir: str, rank: int, device: torch.device):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.folder = os.path.join(run_dir, "profile")
        self.rank, self.device = rank, device
        self.prof = self.span = None

    def before_step(self, step: int) -> None:
        """Call before optimizer step ``step`` (1-based) runs."""
        if not self.first <= step <= self.last:
            return
        from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler
        if self.prof is None:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            os.makedirs(self.folder, exist_ok=True)
            handler = tensorboard_trace_handler(self.folder, worker_name=f"rank{self.rank}")
            self.prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                                on_trace_ready=handler)
            self.prof.__enter__()
        # the step's span, named by its metrics.jsonl number
        self.span = record_function(f"ProfilerStep#{step}")
        self.span.__enter__()

    def after_step(self, step: int) -> None:
        """Call after optimizer step ``step`` finished."""
        if self.prof is None:
            return
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run stops early inside the window)."""
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
