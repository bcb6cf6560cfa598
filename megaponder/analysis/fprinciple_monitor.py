"""The spectral probe inside ``megaponder train`` (``analysis.fprinciple_every`` > 0).

The CLI hands :func:`step_hook` to the trainer, which then calls
``FPrincipleMonitor.maybe_log(step, model, metrics)`` after every step (and once before the first); every ``fprinciple_every`` steps it measures the model on the probe
of megaponder/analysis/fprinciple.py and writes one metrics.jsonl record (and TensorBoard
scalars, if enabled)::

    {"step": 50, "fprinciple/e_low/d=0.05": ..., "fprinciple/e_high/d=0.05": ..., ...,
     "fprinciple/seconds": 0.4}

``d=F`` names the kernel width as the fraction F of the median squared probe distance.
``run_dir/fprinciple_probe.json`` holds the probe's description and the baseline rows
(unigram, bigram, and the step-0 model measured before the first step of a fresh run).

Every data-parallel rank runs the same probe on its full model copy (identical inputs and
weights, so identical numbers; under ZeRO-3 every rank must join the forward anyway) and
rank 0 writes. The probe runs in eval mode without gradients and draws nothing from the
global RNG, so the training trajectory is the same with and without it (a test checks the
losses). A resumed run keeps the probe of the fresh run (same seed, same data, same probes).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from ..safe_files import write_atomic
from .fprinciple import LMProbe, build_lm_probe, read_tokens

PROBE_FILE = "fprinciple_probe.json"
WARN_SHARE = 0.05  # tell the user once if the probe takes more than this share of the run


def metric_keys(rows: list[dict]) -> dict:
    out = {}
    for row in rows:
        out[f"fprinciple/e_low/d={row['fraction']:g}"] = row["e_low"]
        out[f"fprinciple/e_high/d={row['fraction']:g}"] = row["e_high"]
    return out


class FPrincipleMonitor:
    def __init__(self, cfg, run_dir: str, write: bool):
        from ..config import _data_prefixes

        a = cfg.analysis
        self.every = a.fprinciple_every
        self.run_dir, self.write_files = run_dir, write
        t0 = time.time()
        tokens = read_tokens(_data_prefixes(cfg.data.path), a.fprinciple_scan_tokens)
        self.probe: LMProbe = build_lm_probe(tokens, cfg.model.vocab_size, a.fprinciple_context,
                                             a.fprinciple_probes, a.fprinciple_seed)
        self.build_seconds = time.time() - t0
        self.started, self.spent, self.warned = None, 0.0, False

    def maybe_log(self, step: int, model, metrics) -> Optional[dict]:
        if step % self.every:
            return None
        t0 = time.time()
        self.started = self.started or t0
        rows = self.probe.model_errors(model)
        seconds = time.time() - t0
        self.spent += seconds
        record = {"step": step, **metric_keys(rows), "fprinciple/seconds": round(seconds, 3)}
        metrics.write(record)
        share = self.spent / max(time.time() - self.started, 1e-9)
        if step > 0 and share > WARN_SHARE and not self.warned and self.write_files:
            self.warned = True
            print(f"[megaponder] the F-Principle probe has taken {100 * share:.0f}% of the run's time "
                  f"so far; raise analysis.fprinciple_every (now {self.every}) or lower "
                  f"analysis.fprinciple_probes (now {len(self.probe.contexts)}).", flush=True)
        if step == 0 and self.write_files:
            desc = self.probe.describe()
            desc["baselines"]["step0"] = rows
            desc["build_seconds"] = round(self.build_seconds, 3)
            write_atomic(os.path.join(self.run_dir, PROBE_FILE), json.dumps(desc, indent=1))
        return record


def build_monitor(cfg, run_dir: str, rank: int) -> Optional[FPrincipleMonitor]:
    """The probe of a run: None when ``analysis.fprinciple_every`` is 0."""
    if cfg.analysis.fprinciple_every <= 0:
        return None
    return FPrincipleMonitor(cfg, run_dir, write=rank == 0)


def step_hook(trainer):
    """The trainer's step hook (megaponder.train.loop.StepHookFactory), wired by the CLI."""
    monitor = build_monitor(trainer.cfg, trainer.run_dir, trainer.rank)
    return None if monitor is None else monitor.maybe_log
