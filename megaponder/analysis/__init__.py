"""Analyses of trained checkpoints.

``depth``: per-token NLL vs the iterations each token used (AdaPonderLM's high-NLL analysis),
Pearson/Spearman correlation, mean NLL per exit iteration (tools/analyze_depth.py,
docs/families.md "Depth vs difficulty").

Frequency Principle (docs/analysis.md): ``spectral`` (the papers' formulas: DFT peaks and
relative error, projection NUDFT, Gaussian filtering), ``fprinciple_toy`` (1-D and 8x8-digits
reproductions), ``fprinciple`` (the LM spectral probe, per pondering iteration and per Jacobi
pass), ``fprinciple_monitor`` (the probe inside ``megaponder train``), ``fprinciple_cli``
(``megaponder fprinciple``). Import them by module; they are not re-exported here.
"""
from .depth import (analyze_batches, analyze_depth, format_depth_report, full_depth, inference_pruning, pearson, per_iteration_table,
                    rankdata, spearman, token_depth)

__all__ = ["analyze_batches", "analyze_depth", "format_depth_report", "full_depth", "inference_pruning", "pearson", "per_iteration_table",
           "rankdata", "spearman", "token_depth"]
