"""Analyses of trained checkpoints.

``depth``: per-token NLL vs the iterations each token used (AdaPonderLM's high-NLL analysis),
Pearson/Spearman correlation, mean NLL per exit iteration (tools/analyze_depth.py,
docs/families.md "Depth vs difficulty").

Frequency Principle (docs/analysis.md): ``spectral`` (the papers' formulas: DFT peaks and
relative error, projection NUDFT, Gaussian filtering), ``fprinciple_toy`` (1-D and 8x8-digits
reproductions), ``fprinciple`` (the LM spectral probe, per pondering iteration and per Jacobi
pass), ``fprinciple_monitor`` (the probe inside ``megaponder train``), ``fprinciple_cli``
(``megaponder fprinciple``). Import them by module; they are not re-exported here.

The ``depth`` names below load on first use: importing this package (as ``megaponder --help``
does for ``fprinciple_cli`` and ``compare``) must not import torch.
"""
__all__ = ["analyze_batches", "analyze_depth", "format_depth_report", "full_depth", "inference_pruning", "pearson", "per_iteration_table",
           "rankdata", "spearman", "token_depth"]


def __getattr__(name: str):
    if name in __all__:
        from . import depth

        return getattr(depth, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
