"""Throughput, MFU and peak memory for the training log (metrics.jsonl and the progress bar).

* ``step_tokens_per_s``: tokens of every rank per second since the previous log line (the
  cumulative ``tokens_per_s`` of the loop includes the first steps' warm-up and compilation).
* ``mfu``: model FLOPs utilisation = model training FLOPs per token
  (megaponder/models/flops.py: 3x the dense forward, no activation recompute counted) x
  step_tokens_per_s / (processes x ``train.peak_tflops``). Absent without a peak.
* ``mem_peak_mb``: the largest per-rank memory peak and ``mem_peak_mb_per_rank`` each rank's:
  CUDA's peak allocated bytes on a GPU, the process's peak resident set size on CPU (a
  different quantity: it includes the Python heap and libraries), named by ``mem_kind``
  (``cuda_allocated`` / ``cpu_rss``).
"""
from __future__ import annotations

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
        self.peak = cfg.train.peak_tflops
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
