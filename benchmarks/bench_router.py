#!/usr/bin/env python
"""Why does the tiny PonderLM-3 router collapse, and what keeps it token-wise?

Trains examples/configs/tiny-ponderlm3.yml through ``megaponder train`` with one setting
changed at a time and reports, on the first validation batches of the demo split: the
router's mean outcome probabilities s_0..s_K, survivals w_1..w_K, the share of steps the tau
cut keeps, the trajectory of the expected steps 1 + sum_k w_k during training
(metrics.jsonl), the validation perplexity of the pruned model and the criterion of issue 21:
the per-token distribution of expected steps 1 + sum_k w_k (histogram, standard deviation)
and its Spearman correlation with the token's NLL. A router "allocates per token" when that
distribution has spread; a constant (std ~ 0) is a collapse.

``--variants`` picks a set: ``v1`` (penalty weight, router bias init, bias on own steps; the
first study), ``v2`` (router temperature, router warm-up, penalty weight, their mix) or ``v3``
(router learning rate ``ponder.router_lr_mult``; penalty form ``ponder.compute_penalty_form``:
the expected extra steps against PonderNet's KL to a geometric prior).

    python benchmarks/bench_router.py --variants v2 --steps 100 --out-dir runs/router-v2 \
        --output benchmarks/results/router-v2.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from _configs import ROOT, write_report  # noqa: E402  (benchmarks/_configs.py)

sys.path.insert(0, ROOT)

VARIANT_SETS = {
    "v1": {
        "default (penalty 0.01)": [],
        "no penalty": ["ponder.compute_penalty=0.0"],
        "penalty 0.1": ["ponder.compute_penalty=0.1"],
        "router bias +2 on K steps": ["ponder.router_bias_init=2.0"],
        "bias_own_steps false": ["ponder.bias_own_steps=false"],
    },
    "v2": {
        "default (T=1, penalty 0.01)": [],
        "router warm-up 50 steps": ["ponder.router_warmup_steps=50"],
        "temperature 4": ["ponder.router_temperature=4.0"],
        "temperature 4 + warm-up 50": ["ponder.router_temperature=4.0", "ponder.router_warmup_steps=50"],
        "temperature 4 + warm-up 50 + penalty 0.1": ["ponder.router_temperature=4.0",
                                                     "ponder.router_warmup_steps=50",
                                                     "ponder.compute_penalty=0.1"],
      },
    "v3": {
        "default (lr x1, expected-steps penalty 0.01)": [],
        "router lr x0.1": ["ponder.router_lr_mult=0.1"],
        "router lr x0.01": ["ponder.router_lr_mult=0.01"],
        "KL to geometric prior, weight 0.01": ["ponder.compute_penalty_form=kl_geometric"],
        "KL to geometric prior, weight 0.1": ["ponder.compute_penalty_form=kl_geometric",
                                              "ponder.compute_penalty=0.1"],
        "router lr x0.1 + KL weight 0.1": ["ponder.router_lr_mult=0.1",
                                           "ponder.compute_penalty_form=kl_geometric",
                                           "ponder.compute_penalty=0.1"],
    },
}
#: histogram edges of the per-token expected steps 1 + sum_k w_k (K = 2: values in [1, 3])
EDGES = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0001]


def train(run_dir: str, extra: list[str], args) -> None:
    if os.path.exists(os.path.join(run_dir, "checkpoints", "latest")) and args.skip_existing:
        return
    cmd = [sys.executable, "-m", "megaponder", "train", "--config",
           os.path.join(ROOT, "examples", "configs", "tiny-ponderlm3.yml"),
           "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={args.steps}",
           "--set", "train.eval_every=0", "--set", "train.save_every=0",
           "--set", "train.progress_bar=false", "--set", f"train.threads={args.threads}",
           "--set", f"train.log_every={max(1, args.steps // 20)}", "--set", "train.eval_batches=4"]
    for s in list(args.set) + extra:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


@torch.no_grad()
def router_stats(run_dir: str, windows: int) -> dict:
    from megaponder import load_model
    from megaponder.data import IndexedDataset
    from megaponder.train.evaluate import evaluate, model_inputs, sequential_batches

    model = load_model(run_dir)
    data = IndexedDataset(os.path.join(ROOT, "data", "demo", "validation_text_document"))
    batches = list(sequential_batches(data, 128, 8, windows))
    s_all, w_all, nll_all = [], [], []
    stage_ce, n = torch.zeros(model.num_stages, dtype=torch.float64), 0
    for batch in batches:
        inputs = model_inputs(batch)
        ids, targets = inputs["input_ids"], inputs["targets"]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        hidden, state, _, _ = model.latent_forward(ids, pos, None, None)  # final pass's router
        s, log_w, _ = state
        logits, _, _ = model.readout(hidden, state, torch.ones_like(ids, dtype=torch.bool))
        nll_all.append(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none"))
        s_all.append(s.flatten(0, 1))
        w_all.append(log_w.exp().flatten(0, 1))
        # the cross-entropy each stage's hidden state would give as the sole readout: shows
        # whether the router's mass sits on the stage that predicts best
        for k in range(model.num_stages):
            stage_ce[k] += F.cross_entropy(model.head(hidden[:, :, k]).float().flatten(0, 1),
                                           targets.flatten(), reduction="sum").double()
        n += targets.numel()
    s, w, nll = torch.cat(s_all), torch.cat(w_all), torch.cat(nll_all)
    expected = 1.0 + w[:, 1:].sum(-1)     # per-token expected steps 1 + sum_{k>=1} w_k
    from megaponder.analysis.depth import spearman
    hist = torch.histogram(expected.double().clamp(EDGES[0], EDGES[-1] - 1e-6),
                           torch.tensor(EDGES, dtype=torch.float64)).hist
    res = evaluate(model, batches)
    trajectory = [(r["step"], r.get("expected_steps")) for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
                  if "expected_steps" in r]
    return {"s_mean": s.mean(0).tolist(), "w_mean": w.mean(0).tolist(), "w_median": w.median(0).values.tolist(),
            "kept": (w >= model.ponder_cfg.tau).float().mean(0).tolist(), "ppl": res["ppl"],
            "stage_ce": (stage_ce / n).tolist(), "mixture_ce": res["loss"],
            "mean_iters": res["mean_iters"], "trajectory": trajectory,
            "expected_mean": float(expected.mean()), "expected_std": float(expected.std()),
            "expected_p10_p90": [float(expected.quantile(0.1)), float(expected.quantile(0.9))],
            "expected_hist": (hist / hist.sum()).tolist(), "tokens": int(expected.numel()),
            "spearman_nll": spearman(nll, expected)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out-dir", default="runs/router")
    ap.add_argument("--output", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--variants", choices=sorted(VARIANT_SETS), default="v1")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every variant (e.g. "
                    "data.seq_length=64 train.micro_batch_size=4 on a loaded machine)")
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--stats-only", nargs="+", default=None, metavar="RUN_DIR",
                    help="train nothing: the expected-steps statistics of these trained PonderLM-3 "
                         "runs (e.g. the frontier points of bench_matched_init.py), one table row each")
    args = ap.parse_args()
    if args.stats_only:
        md = ["| run | tokens | mean | std | p10, p90 | histogram (share per bin) | Spearman with token NLL "
              "| s_0..s_K (mean) | steps kept (w>=tau) |", "|---|---|---|---|---|---|---|---|---|"]
        for run_dir in args.stats_only:
            r = router_stats(run_dir, args.windows)
            md.append(f"| {run_dir} | {r['tokens']:,} | {r['expected_mean']:.3f} | {r['expected_std']:.3f} | "
                      f"{r['expected_p10_p90'][0]:.3f}, {r['expected_p10_p90'][1]:.3f} | "
                      f"{' '.join(f'{x:.2f}' for x in r['expected_hist'])} | {r['spearman_nll']:+.3f} | "
                      f"{', '.join(f'{x:.3f}' for x in r['s_mean'])} | {', '.join(f'{x:.3f}' for x in r['kept'][1:])} |")
        print("\n".join(md))
        return
    rows = {}
    for i, (name, extra) in enumerate(VARIANT_SETS[args.variants].items()):
        if args.only and name not in args.only:
            continue
        run_dir = os.path.join(args.out_dir, f"v{i}")
        train(run_dir, extra, args)
        cached = os.path.join(run_dir, f"router_stats-{args.windows}.json")
        if args.skip_existing and os.path.exists(cached):
            rows[name] = json.load(open(cached))
        else:
            rows[name] = router_stats(run_dir, args.windows)
            with open(cached, "w") as f:
                json.dump(rows[name], f)
        print(name, json.dumps(rows[name]), flush=True)
    sets = dict(x.split("=", 1) for x in args.set)
    mb, seq = int(sets.get("train.micro_batch_size", 8)), int(sets.get("data.seq_length", 128))
    md = [f"PonderLM-3 router on the tiny config (K=2, {args.steps} steps x {mb} x {seq} = "
          f"{args.steps * mb * seq:,} training tokens, seed 1234, init_method official), statistics over "
          f"the first {args.windows} windows of 128 tokens of the demo validation split.",
          f"Command: `python benchmarks/bench_router.py --variants {args.variants} --steps {args.steps} "
          f"--windows {args.windows} --out-dir {args.out_dir}"
          + (f" --set {' '.join(args.set)}" if args.set else "") + "`", "",
          "Per-token expected steps 1 + w_1 + w_2: " + ", ".join(f"[{a:g}, {b:.4g})" for a, b in zip(EDGES, EDGES[1:]))
          + " share of tokens per bin.", "",
          "| variant | tokens | mean | std | p10, p90 | histogram (share per bin) | Spearman with token NLL |",
          "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['tokens']:,} | {r['expected_mean']:.3f} | {r['expected_std']:.3f} | "
                  f"{r['expected_p10_p90'][0]:.3f}, {r['expected_p10_p90'][1]:.3f} | "
                  f"{' '.join(f'{x:.2f}' for x in r['expected_hist'])} | {r['spearman_nll']:+.3f} |")
    md += ["",
          "| variant | s_0, s_1, s_2 (mean) | w_1, w_2 (mean) | w_2 median | steps kept (w>=tau) | "
          "mean steps | val ppl | CE of stage 0, 1, 2 as sole readout (mixture) | "
          "1+w_1+w_2 during training (step: value) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        traj = ", ".join(f"{s}: {v:.3f}" for s, v in r["trajectory"][:: max(1, len(r["trajectory"]) // 5)])
        md.append(f"| {name} | {', '.join(f'{x:.3f}' for x in r['s_mean'])} | "
                  f"{', '.join(f'{x:.2e}' for x in r['w_mean'][1:])} | {r['w_median'][2]:.2e} | "
                  f"{', '.join(f'{x:.3f}' for x in r['kept'][1:])} | {r['mean_iters']:.3f} | {r['ppl']:.2f} | "
                  f"{', '.join(f'{x:.3f}' for x in r['stage_ce'])} ({r['mixture_ce']:.3f}) | {traj} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.output:
        write_report(args.output, text, rows)


if __name__ == "__main__":
    main()
