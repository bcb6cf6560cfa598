"""metrics.jsonl (one JSON object per logged step), optional TensorBoard and W&B, rank-0 only.

Values are written by Python's json, so a NaN/Inf grad norm or loss appears as ``NaN`` /
``Infinity`` (not ``null``): Python's json, pandas and W&B read it; strict JSON parsers (jq)
need ``--seq``-style leniency or a filter. A kill can tear the last line; readers here skip
it and a resume truncates it away.
"""
from __future__ import annotations

import json
import os
import secrets
import warnings
from typing import Optional

from ..safe_files import open_for_write, real_folder, write_atomic


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = False, resume_step: int = 0,
                 wandb: Optional[dict] = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if resume_step == 0 and os.path.lexists(self.path):
            os.remove(self.path)  # a fresh run never appends to an old run's curve
        elif resume_step > 0:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # a real folder of the run: the event files never land behind a planted link
                self.tb = SummaryWriter(real_folder(os.path.join(run_dir, "tb"), create=True))
            except ImportError:
                print("[megaponder] train.tensorboard=true but the tensorboard package is not "
                      "installed (pip install tensorboard); continuing without it.")
        if wandb:
            self.wandb = _start_wandb(run_dir, **wandb)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint we restart from, so the file
        reads as one uninterrupted run."""
        if not os.path.exists(self.path):
            return
        # the end-of-run validation line of the job that saved `step` goes too: an uninterrupted
        # run has none there (and a resumed finished run writes its own again)
        kept = [json.dumps(r) + "\n" for r in _parse_lines(self.path) if r.get("step", 0) < step
                or (r.get("step") == step and "loss" in r)]
        write_atomic(self.path, "".join(kept), fsync=True)  # fsync, replace, fsync the folder

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open_for_write(self.path, "a") as f:  # never appends through a planted link
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _parse_lines(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a torn (half-written) line is skipped with a warning."""
    records = []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                warnings.warn(f"{path}:{number}: skipping a torn line (a killed run); it is "
                              f"dropped on resume.")
    return records


def read_metrics(run_dir: str) -> list[dict]:
    return _parse_lines(os.path.join(run_dir, "metrics.jsonl"))


def _start_wandb(run_dir: str, project: str, name: Optional[str] = None,
                 entity: Optional[str] = None, config: Optional[dict] = None):
    """A W&B run (imported only when asked for). The run id is kept in ``run_dir/wandb_id`` so
    a resumed job continues the same W&B run; files go to $WANDB_DIR, else ``run_dir``."""
    try:
        import wandb
    except ImportError:
        raise ImportError("train.wandb_project is set but the wandb package is not installed "
                          "(pip install wandb).") from None
    id_file = os.path.join(run_dir, "wandb_id")
    # secrets, not random: drawing from the global Python RNG would change the training run
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(4)
    write_atomic(id_file, run_id + "\n")
    return wandb.init(project=project, name=name or os.path.basename(os.path.abspath(run_dir)),
                      entity=entity, id=run_id, resume="allow", config=config,
                      dir=os.environ.get("WANDB_DIR") or run_dir)


def format_summary(rows: list[tuple[str, Optional[str]]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows if v is not None)
