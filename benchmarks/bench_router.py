#!/usr/bin/env python
"""Why does the tiny PonderLM-3 router collapse (w_2 ~ 7e-4 in benchmarks/results/quality.md)?

Trains examples/configs/tiny-ponderlm3.yml through ``megaponder train`` with one setting
changed at a time (compute-penalty weight, router bias init, bias on the token's own steps)
and reports, on the first validation windows of the demo split: the router's mean outcome
probabilities s_0..s_K, survivals w_1..w_K, the share of steps the tau cut keeps, the
trajectory of the expected steps 1 + sum_k w_k during training (metrics.jsonl) and the
validation perplexity of the pruned model.

    python benchmarks/bench_router.py --steps 40 --out-dir runs/router \
        --output benchmarks/results/router.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "default (penalty 0.01)": [],
    "no penalty": ["ponder.compute_penalty=0.0"],
    "penalty 0.1": ["ponder.compute_penalty=0.1"],
    "router bias +2 on K steps": ["ponder.router_bias_init=2.0"],
    "bias_own_steps false": ["ponder.bias_own_steps=false"],
}


def train(run_dir: str, extra: list[str], args) -> None:
    if os.path.exists(os.path.join(run_dir, "checkpoints", "latest")) and args.skip_existing:
        return
    cmd = [sys.executable, "-m", "megaponder", "train", "--config",
           os.path.join(ROOT, "examples", "configs", "tiny-ponderlm3.yml"),
           "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={args.steps}",
           "--set", "train.eval_every=0", "--set", "train.save_every=0",
           "--set", "train.progress_bar=false", "--set", f"train.threads={args.threads}",
           "--set", f"train.log_every={max(1, args.steps // 20)}", "--set", "train.eval_batches=4"]
    for s in extra:
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
    s_all, w_all = [], []
    stage_ce, n = torch.zeros(model.num_stages, dtype=torch.float64), 0
    for batch in batches:
        inputs = model_inputs(batch)
        ids, targets = inputs["input_ids"], inputs["targets"]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        hidden, (s, log_w, _), _, _ = model.latent_forward(ids, pos, None, None)  # final pass's router
        s_all.append(s.flatten(0, 1))
        w_all.append(log_w.exp().flatten(0, 1))
        # the cross-entropy each stage's hidden state would give as the sole readout: shows
        # whether the router's mass sits on the stage that predicts best
        for k in range(model.num_stages):
            stage_ce[k] += F.cross_entropy(model.head(hidden[:, :, k]).float().flatten(0, 1),
                                           targets.flatten(), reduction="sum").double()
        n += targets.numel()
    s, w = torch.cat(s_all), torch.cat(w_all)
    res = evaluate(model, batches)
    trajectory = [(r["step"], r.get("expected_steps")) for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
                  if "expected_steps" in r]
    return {"s_mean": s.mean(0).tolist(), "w_mean": w.mean(0).tolist(), "w_median": w.median(0).values.tolist(),
            "kept": (w >= model.ponder_cfg.tau).float().mean(0).tolist(), "ppl": res["ppl"],
            "stage_ce": (stage_ce / n).tolist(), "mixture_ce": res["loss"],
            "mean_iters": res["mean_iters"], "trajectory": trajectory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out-dir", default="runs/router")
    ap.add_argument("--output", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--skip-existing", action="store_true")
    args = ap.parse_args()
    rows = {}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        run_dir = os.path.join(args.out_dir, f"v{i}")
        train(run_dir, extra, args)
        rows[name] = router_stats(run_dir, args.windows)
        print(name, json.dumps(rows[name]), flush=True)
    md = [f"PonderLM-3 router on the tiny config (K=2, {args.steps} steps x 8 x 128 tokens, seed 1234), "
          f"statistics over the first {args.windows} windows of 128 of the demo validation split.",
          f"Command: `python benchmarks/bench_router.py --steps {args.steps} --out-dir {args.out_dir}`", "",
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
        with open(args.output, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
