"""Analyses of trained checkpoints.

``depth``: per-token NLL vs the iterations each token used (AdaPonderLM's high-NLL analysis),
Pearson/Spearman correlation, mean NLL per exit iteration (tools/analyze_depth.py,
docs/families.md "Depth vs difficulty").
"""
from .depth import (analyze_batches, analyze_depth, format_depth_report, full_depth, inference_pruning, pearson, per_iteration_table,
                    rankdata, spearman, token_depth)

__all__ = ["analyze_batches", "analyze_depth", "format_depth_report", "full_depth", "inference_pruning", "pearson", "per_iteration_table",
           "rankdata", "spearman", "token_depth"]
