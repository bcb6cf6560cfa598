"""PNG figures of the F-Principle measurements (matplotlib, Agg backend: no display needed).

Heat maps follow the papers: rows = tracked frequencies from low (top) to high, columns =
training steps, a red-blue colormap clipped to [0.1, 1], so a cell is deep blue once that
frequency's relative error is below 0.1 (fitted) and red while it is near 1 (not yet).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(ax, values, steps, labels, title):
    im = ax.imshow(np.asarray(values), aspect="auto", cmap="RdBu_r", vmin=0.1, vmax=1.0,
                   interpolation="nearest", extent=(steps[0], steps[-1], len(labels) - 0.5, -0.5))
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    return im


def _save(fig, path: str) -> str:
    fig.tight_layout()
    return _save_nolayout(fig, path)


def plot_1d(results: Sequence[dict], path: str) -> str:
    """One column per run (small / large init): Δ_F heat map, spectra, fits on the fine grid."""
    plt = _plt()
    fig, axes = plt.subplots(3, len(results), figsize=(4.2 * len(results), 8.4), squeeze=False,
                             constrained_layout=True)
    for col, r in enumerate(results):
        title = f"init {r['init']} (σ={r['init_std']:g})"
        im = _heatmap(axes[0, col], r["delta_f"], r["steps"], [f"k={k}" for k in r["peaks"]],
                      f"Δ_F at target peaks, {title}")
        ax = axes[1, col]
        kmax = max(r["peaks"]) * 3 if r["peaks"] else 20
        ax.semilogy(r["target_amplitude"][:kmax], "k-", label="target")
        ax.semilogy(r["output_amplitude"][:kmax], "r--", label=f"output, step {r['steps'][-1]}")
        ax.plot(r["peaks"], [r["target_amplitude"][k] for k in r["peaks"]], "ko", mfc="none")
        ax.set_xlabel("frequency index k")
        ax.set_ylabel("|DFT| / n")
        ax.set_ylim(1e-6, 1)
        ax.legend(fontsize=7)
        ax = axes[2, col]
        ax.plot(r["x"], r["y"], "k.", ms=2, label="training points")
        for step, fit in r["fits"].items():
            ax.plot(r["x_fine"], fit, lw=1, label=f"step {step}")
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
    return _save_nolayout(fig, path)


def _save_nolayout(fig, path: str) -> str:
    # a colorbar over several axes needs constrained layout, which tight_layout would undo
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def plot_digits(results: Sequence[dict], path: str) -> str:
    """One column per run: e_low / e_high per δ over steps; projection Δ_F heat map; the
    target's projected spectrum with its peaks."""
    plt = _plt()
    fig, axes = plt.subplots(3, len(results), figsize=(4.2 * len(results), 8.4), squeeze=False,
                             constrained_layout=True)
    for col, r in enumerate(results):
        title = f"{r['model']}, init {r['init']} (σ={r['init_std']:g})"
        ax = axes[0, col]
        for i, f in enumerate(r["filtering"]):
            color = plt.cm.viridis(i / max(1, len(r["filtering"]) - 1))
            ax.plot(r["steps"], f["e_low"], "-", color=color, label=f"δ={f['fraction']:g}·med low")
            ax.plot(r["steps"], f["e_high"], "--", color=color)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"filtering: e_low (solid) / e_high (dashed)\n{title}", fontsize=9)
        ax.legend(fontsize=6)
        pr = r["projection"]
        im = _heatmap(axes[1, col], pr["delta_f"], r["steps"], [f"k={k:.2f}" for k in pr["peak_freqs"]],
                      "projection on PC1: Δ_F at peaks")
        ax = axes[2, col]
        ax.plot(pr["freqs"], pr["target_amplitude"], "k-")
        ax.plot(pr["peak_freqs"], [pr["target_amplitude"][k] for k in pr["peaks"]], "ro", mfc="none")
        ax.set_yscale("log")
        ax.set_xlabel("frequency k along PC1 (cycles per unit)")
        ax.set_ylabel("‖ŷ_p(k)‖")
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8)
    return _save_nolayout(fig, path)


def plot_lm_curves(curves: dict, baselines: dict, path: str, title: str = "") -> str:
    """e_low / e_high per δ against a step-like axis (``curves``: label -> {"x": [...],
    "rows": [[{fraction, e_low, e_high}...] per x]}); baselines as horizontal lines."""
    plt = _plt()
    deltas = sorted({row["fraction"] for c in curves.values() for rows in c["rows"] for row in rows})
    fig, axes = plt.subplots(1, len(deltas), figsize=(3.2 * len(deltas), 3.2), squeeze=False)
    for j, delta in enumerate(deltas):
        ax = axes[0, j]
        for label, c in curves.items():
            lows = [next(r["e_low"] for r in rows if r["fraction"] == delta) for rows in c["rows"]]
            highs = [next(r["e_high"] for r in rows if r["fraction"] == delta) for rows in c["rows"]]
            line, = ax.plot(c["x"], lows, "-o", ms=3, label=f"{label} low")
            ax.plot(c["x"], highs, "--s", ms=3, color=line.get_color(), label=f"{label} high")
        for k, (name, rows) in enumerate(baselines.items()):
            row = next(r for r in rows if r["fraction"] == delta)
            ax.axhline(row["e_low"], color=f"C{k + 5}", lw=0.8, ls="-", label=f"{name} low")
            ax.axhline(row["e_high"], color=f"C{k + 5}", lw=0.8, ls=":", label=f"{name} high")
        ax.set_title(f"δ={delta:g}·median sq. distance", fontsize=9)
        ax.set_xlabel(next(iter(curves.values())).get("xlabel", "step"))
        if j == 0:
            ax.set_ylabel("relative error")
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
