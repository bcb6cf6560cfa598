"""``analysis:`` — measurements taken during training (docs/analysis.md)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import param


@dataclass
class AnalysisConfig:
    fprinciple_every: int = param(0, "Run the F-Principle spectral probe every N optimizer steps "
                                  "(and at step 0), logging e_low/e_high per kernel width to "
                                  "metrics.jsonl as fprinciple/e_low/d=F (F: the width as a "
                                  "fraction of the median squared probe distance); 0 disables. "
                                  "Its cost per step at 50 is in BENCHMARKS.md. "
                                  "Single-device and data-parallel layouts only (tp = pp = 1).")
    fprinciple_probes: int = param(512, "Distinct training contexts N probed (cost grows as N² times the vocabulary size).")
    fprinciple_context: int = param(3, "Context length c: the probe feeds the model these c "
                                    "tokens only, so its prediction is a function of the probe input.")
    fprinciple_scan_tokens: int = param(1_000_000, "Leading tokens of data.path scanned for the "
                                        "contexts and their empirical next-token distributions.")
    fprinciple_seed: int = param(0, "Seed of the probe positions and of the reference embedding table.")
