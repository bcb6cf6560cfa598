"""``megaponder compare RUN_DIR...``: the runs side by side, in one table.

Each run contributes what its run dir already holds: the final validation row of
``metrics.jsonl`` (``val_ppl``, ``val_mean_iters``, ``val_flops_ratio``, written after the last
step) and the last training row (step, tokens). Perplexities are only comparable on the same
tokens, so the table says which validation data and sequence length each run used and marks
the ones that differ from the first run; ``--data PREFIX`` instead scores every run's latest
checkpoint on the same windows of one dataset (as ``megaponder eval``).

The two compute scales (see megaponder/models/flops.py): ``mean_iters`` (backbone passes per
token, the papers' ratio) and ``flops_ratio`` (inference matmul FLOPs against a vanilla model of
the same shape).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import UserError

COLUMNS = (("run", "run"), ("family", "family"), ("steps", "steps"), ("tokens", "tokens"),
           ("ppl", "ppl"), ("mean_iters", "mean_iters"), ("flops_ratio", "flops_ratio"),
           ("data", "scored on"))


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run dir (no metrics.jsonl); pass the train.run_dir "
                        f"of finished or running runs.")
    rows = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a row being written by a running trainer is skipped
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def read_run(run_dir: str) -> dict:
    """One table row from a run dir's config.yml and metrics.jsonl."""
    from ..config import load_config

    rows = _read_metrics(run_dir)
    config_path = os.path.join(run_dir, "config.yml")
    cfg = load_config(config_path, check_paths=False) if os.path.isfile(config_path) else None
    train_rows = [r for r in rows if "loss" in r]
    final = next((r for r in reversed(rows) if "val_flops_ratio" in r), None)
    last = train_rows[-1] if train_rows else {}
    valid = (cfg.data.valid_path or cfg.data.path) if cfg is not None else None
    return {
        "run": run_dir,
        "family": cfg.model.family if cfg is not None else "?",
        "steps": (final or last).get("step"),
        "tokens": (final or last).get("tokens"),
        "ppl": final.get("val_ppl") if final else None,
        "mean_iters": final.get("val_mean_iters") if final else last.get("mean_iters"),
        "flops_ratio": final.get("val_flops_ratio") if final else last.get("flops_ratio"),
        "data": (f"{','.join(map(str, valid))} @{cfg.data.seq_length}" if valid else "?"),
        "finished": final is not None,
    }


def score_on(run: dict, data_prefix: str, max_samples: Optional[int], batch_size: int = 8,
             seq_length: Optional[int] = None) -> dict:
    """Replace ``run``'s validation numbers with its latest checkpoint scored on
    ``data_prefix`` (the same windows for every run)."""
    from ..data import IndexedDataset
    from ..train.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint
    from ..train.evaluate import evaluate, sequential_batches

    folder = resolve_checkpoint(run["run"])
    cfg = read_checkpoint_config(folder)
    seq = seq_length or cfg.data.seq_length
    batches = sequential_batches(IndexedDataset(data_prefix), seq, batch_size, max_samples)
    result = evaluate(load_model(folder), batches, progress=False)
    meta_step = os.path.basename(folder)
    return {**run, "ppl": result["ppl"], "mean_iters": result["mean_iters"],
            "flops_ratio": result["flops_ratio"], "data": f"{data_prefix} @{seq} ({meta_step})"}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "tokens":
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}" if key != "ppl" else f"{value:.2f}"
    return str(value)


def format_table(runs: list[dict]) -> str:
    """A plain-text table; a run validated on other data than the first is marked '*'."""
    header = [title for _, title in COLUMNS]
    body = []
    for run in runs:
        cells = [_cell(key, run.get(key)) for key, _ in COLUMNS]
        if run["data"] != runs[0]["data"]:
            cells[COLUMNS.index(("ppl", "ppl"))] += "*"
        if not run.get("finished", True):
            cells[0] += " (running)"
        body.append(cells)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(run["data"] != runs[0]["data"] for run in runs):
        lines.append("* scored on other data than the first run: its ppl is not comparable; "
                     "use --data PREFIX to score every run on the same windows.")
    return "\n".join(lines)


def plot(runs: list[dict], path: str) -> None:
    """Perplexity against each compute scale, one point per run (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "mean_iters", "backbone passes per token (mean_iters)"),
                           (axes[1], "flops_ratio", "inference FLOPs vs vanilla (flops_ratio)")):
        for run in runs:
            if run.get("ppl") is None or run.get(key) is None:
                continue
            ax.scatter(run[key], run["ppl"])
            ax.annotate(os.path.basename(os.path.normpath(run["run"])), (run[key], run["ppl"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(run_dirs: list[str], plot_path: Optional[str] = None, data: Optional[str] = None,
            max_samples: Optional[int] = None, as_json: bool = False) -> str:
    """The text ``megaponder compare`` prints (and the plot it writes)."""
    runs = [read_run(d) for d in run_dirs]
    if data is not None:
        runs = [score_on(run, data, max_samples) for run in runs]
    if plot_path:
        plot(runs, plot_path)
    return json.dumps(runs) if as_json else format_table(runs)


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="runs side by side: ppl, mean_iters, flops_ratio, tokens, steps")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.run_dir of each run")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also write ppl against both compute scales")
    p.add_argument("--data", default=None, metavar="PREFIX",
                   help="score every run's latest checkpoint on this indexed dataset instead of "
                        "reading its own validation numbers (same windows for all)")
    p.add_argument("--max-samples", type=int, default=None, help="with --data: windows to score")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=lambda args: print(compare(args.runs, args.plot, args.data,
                                                   args.max_samples, args.json)) or 0)
