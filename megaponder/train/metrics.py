"""metrics.jsonl (one JSON object per logged step), optional TensorBoard, rank-0 only."""
from __future__ import annotations

import json
import os
from typing import Optional


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = False, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if resume_step == 0 and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run never appends to an old run's curve
        elif resume_step > 0:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("[megaponder] train.tensorboard=true but the tensorboard package is not "
                      "installed (pip install tensorboard); continuing without it.")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint we restart from, so the file
        reads as one uninterrupted run."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_summary(rows: list[tuple[str, Optional[str]]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows if v is not None)
