"""Depth vs difficulty: does a token's NLL go with the number of iterations it used?

AdaPonderLM's high-NLL analysis (docs/papers.md §1.3): tokens that exit early have the
lowest mean NLL, tokens still active in the last iterations are the hard ones. This module
measures that on any checkpoint:

* per-token NLL of the next-token prediction at position t (fp32 cross-entropy of the logits
  the model gives in eval mode — for AdaPonderLM and PonderLM-3 the same logits as the
  compacted KV-cached inference path, tests/test_families_consistency.py);
* per-token iterations from ``model(ids, return_token_stats=True).stats["token_iterations"]``
  (every family accepts the kwarg): AdaPonderLM / fixed_pruning / random_halting = 1 + the
  iteration after which the token halted (K+1 if it never halts); PonderLM-3 = executed steps
  1 + K-hat_t under the router's tau cut (plus ``token_expected_steps``, the router's soft
  1 + sum_k w_k, as a second, continuous measure); fixed-depth families = their constant;
* Pearson and Spearman (average ranks for ties) correlation between the two, the counts and
  mean NLL per exit iteration.

    from megaponder import load_model
    from megaponder.analysis import analyze_depth
    res = analyze_depth(load_model("runs/tiny-adaponderlm"), "data/demo/validation_text_document",
                        windows=64, seq_length=128)
    print(format_depth_report(res))

Correlations are computed in float64 with plain torch (no numpy/scipy needed); a constant
input gives ``nan`` (undefined correlation), never an exception.
"""
from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

from ..models.base import IGNORE_INDEX
from ..models.spec import family_spec

__all__ = ["token_depth", "full_depth", "inference_pruning", "pearson", "spearman", "rankdata", "per_iteration_table",
           "analyze_depth", "analyze_batches", "format_depth_report"]


@torch.no_grad()
def token_depth(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, **kwargs) -> dict:
    """One forward in eval mode -> ``{"nll": [B, T], "iterations": [B, T], "entropy": [B, T]
    (of the predicted distribution), "valid": [B, T] bool, "expected_steps": [B, T]
    (PonderLM-3 only)}`` (float64 / bool, on CPU)."""
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, return_token_stats=True, **kwargs)
    finally:
        model.train(was_training)
    logits = out.logits.float()
    valid = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp_min(0),
                          reduction="none").view(targets.shape)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    res = {"nll": nll.double().cpu(), "iterations": out.stats["token_iterations"].double().cpu(),
           "entropy": entropy.double().cpu(), "valid": valid.cpu()}
    if "token_expected_steps" in out.stats:
        res["expected_steps"] = out.stats["token_expected_steps"].double().cpu()
    # the forward's own compute numbers, both scales (docs/families.md "FLOPs convention")
    res["flops_ratio"] = float(out.stats.get("flops_ratio", 1.0))
    res["jacobi_passes"] = float(out.stats.get("jacobi_passes", 0.0))
    res["jacobi_residual"] = float(out.stats.get("jacobi_residual", 0.0))
    return res


@contextmanager
def full_depth(model: torch.nn.Module):
    """Counterfactual without halting: ``ponder.tau`` = 0 keeps every AdaPonderLM token active
    (s >= 0 always); PonderLM-3 gets the smallest positive float (log tau must exist), which
    keeps every step (log w is finite); other families are unchanged."""
    cfg = getattr(model, "ponder_cfg", None)
    old = getattr(cfg, "tau", None)
    tau = family_spec(model.family).full_depth_tau
    if cfg is not None and tau is not None:
        cfg.tau = tau
    try:
        yield model
    finally:
        if cfg is not None:
            cfg.tau = old


@contextmanager
def inference_pruning(model: torch.nn.Module, enabled: bool = True):
    """PonderLM-3: evaluate with ``ponder.eval_hard_prune`` = ``enabled``: true is the
    inference semantics (steps with w < tau neither attended to nor mixed in, the default of
    every evaluation), so the NLL is the one the pruned decoder gives
    (tests/test_families_consistency.py); false is the soft-bias training forward's. No-op for
    other families."""
    cfg = getattr(model, "ponder_cfg", None)
    if cfg is None or family_spec(model.family).halting != "router":
        yield model
        return
    old = cfg.eval_hard_prune
    cfg.eval_hard_prune = bool(enabled)
    try:
        yield model
    finally:
        cfg.eval_hard_prune = old


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length 1-D sequences (nan when either is constant)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"pearson: {x.numel()} vs {y.numel()} values")
    if x.numel() < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = dx.pow(2).sum().sqrt(), dy.pow(2).sum().sqrt()
    if sx.item() == 0.0 or sy.item() == 0.0:
        return float("nan")
    return float((dx * dy).sum() / (sx * sy))


def rankdata(x) -> torch.Tensor:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks_sorted = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return ranks_sorted
    # group boundaries of equal values in sorted order
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = xs[1:] != xs[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1
    starts = torch.nonzero(new_group).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    avg = (starts + 1 + ends).double() / 2.0  # mean of positions start+1 .. end (1-based)
    ranks_sorted = avg[group_id]
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = ranks_sorted
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation = Pearson correlation of average ranks."""
    return pearson(rankdata(x), rankdata(y))


def per_iteration_table(nll, iterations) -> list[dict]:
    """Rows ``{iterations, count, share, mean_nll}`` per distinct (exit) iteration count,
    ascending (non-integer counts, e.g. PonderLM-3 expectations, are not grouped: pass the
    executed counts)."""
    nll = torch.as_tensor(nll, dtype=torch.float64).flatten()
    it = torch.as_tensor(iterations, dtype=torch.float64).flatten()
    n = max(nll.numel(), 1)
    rows = []
    for v in torch.unique(it).tolist():
        sel = it == v
        c = int(sel.sum())
        rows.append({"iterations": int(v) if float(v).is_integer() else v, "count": c, "share": c / n,
                     "mean_nll": float(nll[sel].mean())})
    return rows


def analyze_batches(model: torch.nn.Module, batches: Iterable[dict], compare_full_depth: bool = False,
                    top_tokens: int = 10, hard_prune: bool = True, **forward_kwargs) -> dict:
    """Depth statistics over batches of ``{"tokens": [B, T+1]}`` (model_inputs convention).

    Besides NLL vs iterations: the correlation of the predictive entropy with iterations, the
    most frequent input token ids per exit iteration, and with ``compare_full_depth`` the NLL of
    the same tokens with halting switched off (:func:`full_depth`), i.e. what halting cost each
    exit group (``mean_nll_full_depth`` per row, ``delta_nll_halting`` overall). PonderLM-3 is
    evaluated with hard pruning (:func:`inference_pruning`) unless ``hard_prune=False``."""
    from ..train.evaluate import model_inputs

    cols = {"nll": [], "iterations": [], "entropy": [], "expected_steps": [], "nll_full": [], "ids": []}
    compute = torch.zeros(4, dtype=torch.float64)  # flops_ratio * n, n, Jacobi passes, batches
    residual = 0.0
    for i, batch in enumerate(batches):
        if hasattr(model, "set_eval_stream"):
            # batch i draws evaluate()'s pattern for batch i (pruning baselines): without it
            # every batch would reuse one pattern and the numbers would not be evaluate()'s
            model.set_eval_stream(i)
        inputs = model_inputs(batch)
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "targets")}
        kwargs.update(forward_kwargs)
        with inference_pruning(model, hard_prune):
            d = token_depth(model, inputs["input_ids"], inputs["targets"], **kwargs)
        v = d["valid"]
        compute += torch.tensor([d["flops_ratio"] * float(v.sum()), float(v.sum()), d["jacobi_passes"], 1.0],
                                dtype=torch.float64)
        residual = max(residual, d["jacobi_residual"])
        for k in ("nll", "iterations", "entropy", "expected_steps"):
            if k in d:
                cols[k].append(d[k][v])
        cols["ids"].append(inputs["input_ids"].cpu()[v])
        if compare_full_depth:
            with full_depth(model), inference_pruning(model, hard_prune):
                cols["nll_full"].append(token_depth(model, inputs["input_ids"], inputs["targets"], **kwargs)["nll"][v])
    if not cols["nll"]:
        raise ValueError("analyze_batches: no batches")
    nll, its, ent, ids = (torch.cat(cols[k]) for k in ("nll", "iterations", "entropy", "ids"))
    rows = per_iteration_table(nll, its)
    for row in rows:
        sel = its == float(row["iterations"])
        row["mean_entropy"] = float(ent[sel].mean())
        row["top_input_tokens"] = [[t, c] for t, c in Counter(ids[sel].tolist()).most_common(top_tokens)]
    res = {"family": getattr(model, "family", type(model).__name__), "tokens": int(nll.numel()),
           "hard_prune": bool(hard_prune and family_spec(model.family).halting == "router"),
           "mean_nll": float(nll.mean()), "ppl": math.exp(min(float(nll.mean()), 50.0)),
           "mean_iterations": float(its.mean()),
           "flops_ratio": compute[0].item() / max(compute[1].item(), 1.0),
           "iteration_kind": _iteration_kind(model),
           "pearson": pearson(nll, its), "spearman": spearman(nll, its),
           "entropy": {"mean": float(ent.mean()), "pearson": pearson(ent, its), "spearman": spearman(ent, its)},
           "per_iteration": rows}
    from ..train.evaluate import computation
    info = computation(model, compute[2].item() / max(compute[3].item(), 1.0), residual)
    info.pop("hard_prune", None)   # what this analysis used is res["hard_prune"]
    res.update(info)
    if cols["expected_steps"]:
        exp = torch.cat(cols["expected_steps"])
        res["expected_steps"] = {"mean": float(exp.mean()), "pearson": pearson(nll, exp),
                                 "spearman": spearman(nll, exp)}
    if compare_full_depth:
        full = torch.cat(cols["nll_full"])
        res["mean_nll_full_depth"] = float(full.mean())
        res["delta_nll_halting"] = float((nll - full).mean())
        for row in rows:
            sel = its == float(row["iterations"])
            row["mean_nll_full_depth"] = float(full[sel].mean())
    return res


def _iteration_kind(model) -> str:
    return family_spec(model.family).iteration_kind


def analyze_depth(model: torch.nn.Module, data: Union[str, object], windows: int = 64,
                  seq_length: Optional[int] = None, batch_size: int = 8, compare_full_depth: bool = False,
                  **forward_kwargs) -> dict:
    """Depth statistics over the first ``windows`` non-overlapping windows of ``seq_length + 1``
    tokens of an indexed dataset (prefix or ``IndexedDataset``), in file order
    (``megaponder.train.evaluate.sequential_batches``, as ``megaponder eval``)."""
    from ..data import IndexedDataset
    from ..train.evaluate import sequential_batches

    ds = IndexedDataset(str(data)) if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__") else data
    seq_length = seq_length or getattr(model.cfg, "max_position_embeddings", 128)
    res = analyze_batches(model, sequential_batches(ds, seq_length, batch_size, windows),
                          compare_full_depth=compare_full_depth, **forward_kwargs)
    res.update({"windows": windows, "seq_length": seq_length, "data": str(data)})
    return res


def format_depth_report(res: dict) -> str:
    lines = [f"family {res['family']}: {res['tokens']:,} tokens"
             + (f" ({res['windows']} windows x {res['seq_length']})" if "windows" in res else ""),
             f"  iterations: {res['iteration_kind']}",
             f"  mean NLL {res['mean_nll']:.4f} (ppl {res['ppl']:.2f}), mean iterations {res['mean_iterations']:.4f} "
             f"(backbone passes/token, the papers' ratio), inference flops_ratio {res.get('flops_ratio', 1.0):.4f}"
             + (f"\n  PonderLM-2/3 evaluation: {res['eval_mode']}, {res['jacobi_passes']:.1f} Jacobi passes/batch"
                if "eval_mode" in res else ""),
             f"  corr(NLL, iterations): Pearson {res['pearson']:.4f}, Spearman {res['spearman']:.4f}"]
    if "expected_steps" in res:
        e = res["expected_steps"]
        lines.append(f"  corr(NLL, expected steps 1+sum w): Pearson {e['pearson']:.4f}, "
                     f"Spearman {e['spearman']:.4f} (mean {e['mean']:.4f})")
    if "entropy" in res:
        e = res["entropy"]
        lines.append(f"  corr(entropy, iterations): Pearson {e['pearson']:.4f}, Spearman {e['spearman']:.4f}")
    full = "mean_nll_full_depth" in res
    if full:
        lines.append(f"  mean NLL with halting off (tau=0) {res['mean_nll_full_depth']:.4f} "
                     f"(halting costs {res['delta_nll_halting']:+.4f} nats/token)")
    lines += ["", "  exit iteration      tokens   share   mean NLL  entropy" + ("  NLL tau=0" if full else "")]
    for row in res["per_iteration"]:
        lines.append(f"  {str(row['iterations']):>14}  {row['count']:>10,}  {row['share']:6.3f}  {row['mean_nll']:9.4f}"
                     f"  {row.get('mean_entropy', float('nan')):7.3f}"
                     + (f"  {row['mean_nll_full_depth']:9.4f}" if full else ""))
    for row in res["per_iteration"]:
        if row.get("top_input_tokens_text"):
            lines.append(f"  exit {row['iterations']}: most frequent inputs {row['top_input_tokens_text']}")
    return "\n".join(lines)
