#!/usr/bin/env python
"""Sensitivity of the papers' open implementation choices (issue 13, finding 7).

Trains the tiny AdaPonderLM and PonderLM-3 configs (examples/configs/tiny-<family>.yml: d=128,
2 layers, seq 128, micro-batch 8) through the real ``megaponder train`` CLI for ``--steps``
steps per setting, one config key changed at a time, and reports the trainer's final
validation perplexity, passes per token (``mean_iters``, the papers' scale) and inference
``flops_ratio`` per setting. A second seed of each family's default is trained too: a setting
whose ppl moves by less than that seed gap is not distinguishable at this scale.

The choices (docs/families.md "Open choices"):

- AdaPonderLM gate MLP width (``ponder.gate_hidden_mult``, paper "4h") and activation
  (``ponder.gate_activation``, not stated); which gates enter the bottom-k pool
  (``ponder.bottomk_pool``, open question 4);
- PonderLM-3 router width (``ponder.router_hidden_mult``, "lightweight"), compute-penalty weight
  (``ponder.compute_penalty``, form and weight not given) and the log-w bias on the token's own
  later steps (``ponder.bias_own_steps``, open question 3).

    python benchmarks/bench_choices.py --steps 40 --threads 1 --jobs 2 \\
        --out-dir runs/choices --output benchmarks/results/choices.md
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _configs import write_report  # noqa: E402
from bench_quality import ROOT, final_record, train  # noqa: E402  (one training/record path for both studies)

# (family, setting name, --set overrides); the first of each family is its default
SETTINGS = [
    ("adaponderlm", "default (gate 4d, gelu, pool active)", []),
    ("adaponderlm", "default, train.seed=1", ["train.seed=1"]),
    ("adaponderlm", "gate_hidden_mult=1", ["ponder.gate_hidden_mult=1"]),
    ("adaponderlm", "gate_activation=relu", ["ponder.gate_activation=relu"]),
    ("adaponderlm", "gate_activation=silu", ["ponder.gate_activation=silu"]),
    ("adaponderlm", "bottomk_pool=all", ["ponder.bottomk_pool=all"]),
    ("adaponderlm", "halted_readout=final", ["ponder.halted_readout=final"]),
    ("ponderlm3", "default (router d, penalty 0.01, own steps)", []),
    ("ponderlm3", "default, train.seed=1", ["train.seed=1"]),
    ("ponderlm3", "router_hidden_mult=4", ["ponder.router_hidden_mult=4"]),
    ("ponderlm3", "compute_penalty=0", ["ponder.compute_penalty=0.0"]),
    ("ponderlm3", "compute_penalty=0.1", ["ponder.compute_penalty=0.1"]),
    ("ponderlm3", "bias_own_steps=false", ["ponder.bias_own_steps=false"]),
]


def run_name(family: str, setting: str) -> str:
    short = setting.split(" (")[0].replace(", ", "-")
    return f"{family}-" + "".join(c if c.isalnum() or c in "=._-" else "_" for c in short)


def fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="train.threads of every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    ap.add_argument("--eval-batches", type=int, default=16, help="final validation micro-batches (x8x128)")
    ap.add_argument("--families", nargs="*", default=["adaponderlm", "ponderlm3"])
    ap.add_argument("--settings", nargs="*", default=None,
                    help="train only the settings whose name contains one of these strings "
                         "(each family's default and its seed run are always kept)")
    ap.add_argument("--halting-warmup", nargs=2, type=float, default=[0.3, 0.6],
                    help="AdaPonderLM bottom-k warm-up start/end as fractions of --steps")
    ap.add_argument("--out-dir", default="runs/choices")
    ap.add_argument("--output", default="benchmarks/results/choices.md")
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)
    s0, s1 = (int(round(f * args.steps)) for f in args.halting_warmup)
    ada = [f"ponder.halting_warmup_start={s0}", f"ponder.halting_warmup_end={s1}"]
    todo = [(fam, name, extra) for fam, name, extra in SETTINGS if fam in args.families
            and (args.settings is None or name.startswith("default") or any(k in name for k in args.settings))]

    def one(item):
        fam, name, extra = item
        rec = train(run_name(fam, name), fam, args, (ada if fam == "adaponderlm" else []) + extra)
        rec["setting"] = name
        # PonderLM-3: the router's expected steps 1 + sum_k w_k at the last logged training step
        rec["train_expected_steps"] = (final_record(rec["run_dir"])["last_train"] or {}).get("expected_steps")
        return rec

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, todo))

    md = [f"{args.steps} steps x 8 sequences x 128 tokens per setting ({args.steps * 1024:,} tokens), "
          f"train.threads={args.threads}, {args.jobs} run(s) at a time; final validation on "
          f"{args.eval_batches} micro-batches of data/demo/validation_text_document (the trainer's). "
          f"AdaPonderLM bottom-k warm-up {s0}->{s1}. Δ ppl is against the family's default (seed 1234).", ""]
    for fam in args.families:
        rows = [r for r in results if r["family"] == fam]
        if not rows:
            continue
        ref = rows[0]["val_ppl"]
        md += [f"### {fam}", "",
               "| setting | val ppl | Δ ppl vs default | mean_iters (passes/token) | flops_ratio | "
               "router expected steps (last train step) | last train loss | train s |",
               "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['setting']} | {r['val_ppl']:.2f} | {r['val_ppl'] - ref:+.2f} | {r['mean_iters']:.3f} | "
                      f"{r['flops_ratio']:.3f} | {fmt(r['train_expected_steps'])} | {r['last_loss']:.3f} | "
                      f"{r['train_time_s']:.0f} |")
        md.append("")
    md += ["Commands:", "", "```"] + [r["command"] for r in results] + ["```", ""]
    text = "\n".join(md)
    print(text)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    write_report(args.output, "# Open implementation choices: sensitivity on the tiny configs (generated)\n\n"
                 + text, {"steps": args.steps, "runs": results})


if __name__ == "__main__":
    main()
