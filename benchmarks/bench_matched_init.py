#!/usr/bin/env python
"""Matched-initialisation, multi-seed comparison of the families (issue 21, item 7).

Every run uses the same ``model.init_method`` (default ``official``: the pondering papers'
truncated normal, which since issue 21 applies to vanilla too; docs/families.md
"Initialisation"), the tiny configs (examples/configs/tiny*.yml: d=128, 2 layers, seq 128,
micro-batch 8), the same data and step count, and several ``train.seed`` values (init, data
order). Each run is scored with ``megaponder eval`` on the whole demo validation split (the
same tokens for every run). Reported per variant: mean validation perplexity over the seeds
and its 95% confidence interval (Student t, n-1 degrees of freedom), and each family's
difference to vanilla paired by seed (same seed = same data order) with its 95% interval.

Variants: vanilla; vanilla with twice the layers ("2x depth": twice the non-embedding
parameters, PonderLM-2's 410m_x2depth construction), the counterpart of the papers'
"matches a vanilla model with about twice the parameters" claims; vanilla under GPT-NeoX
small_init/wang (Pythia's own scheme, the init confound of the earlier studies); pause
(3 pause tokens), loop (K=3), PonderLM (K=3), PonderLM-2 (K=1).

    python benchmarks/bench_matched_init.py --steps 100 --seeds 1234 1 2 \\
        --out-dir runs/matched --output benchmarks/results/matched-init.md

Runs go one at a time; ``--skip-existing`` reuses finished runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import ROOT, final_record, megaponder_eval, train  # noqa: E402

#: name -> (family whose tiny config is used, extra --set values)
VARIANTS = {
    "vanilla": ("vanilla", []),
    "vanilla 2x depth": ("vanilla", ["model.num_layers=4"]),
    "vanilla small_init_wang": ("vanilla", ["model.init_method=small_init_wang"]),
    "pause (3 tokens)": ("pause", []),
    "loop (K=3)": ("loop", []),
    "ponderlm (K=3)": ("ponderlm", []),
    "ponderlm2 (K=1)": ("ponderlm2", []),
}

#: the papers' claims this scale can speak to: (variant, reference, claimed sign of the
#: paired perplexity difference variant - reference, source)
CLAIMS = [
    ("ponderlm (K=3)", "vanilla", -1, "PonderLM beats vanilla at equal parameters (PonderLM Table 2: 14.16 vs 16.95 ppl, 70M)"),
    ("ponderlm (K=3)", "vanilla 2x depth", -1, "PonderLM matches a vanilla model with ~2x the parameters (PonderLM abstract); tested as 'not worse'"),
    ("ponderlm (K=3)", "loop (K=3)", -1, "PonderLM beats the looped model at equal passes (PonderLM Table 2: 14.16 vs 15.33)"),
    ("ponderlm (K=3)", "pause (3 tokens)", -1, "PonderLM beats pause tokens (PonderLM Table 2: 14.16 vs 16.53)"),
    ("pause (3 tokens)", "vanilla", -1, "pause slightly beats vanilla (PonderLM Table 2: 16.53 vs 16.95)"),
    ("loop (K=3)", "vanilla", -1, "loop beats vanilla (PonderLM Table 2: 15.33 vs 16.95)"),
    ("ponderlm2 (K=1)", "vanilla", -1, "PonderLM-2 beats vanilla"),
    ("ponderlm2 (K=1)", "vanilla 2x depth", -1, "PonderLM-2 (1 thought) beats a vanilla model with 2x the parameters (PonderLM-2 abstract; 410M README vs 410m_x2depth)"),
    ("vanilla 2x depth", "vanilla", -1, "sanity: more parameters help at this budget"),
    ("vanilla small_init_wang", "vanilla", 0, "init confound: Pythia's GPT-NeoX init against the papers' truncated normal"),
]

#: two-sided 97.5% Student t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def verdict(diff: float, half: float, claim_sign: int) -> str:
    """'reproduced' when the interval excludes 0 on the claimed side, 'contradicted' when it
    excludes 0 on the other side, else 'inside noise'."""
    if math.isnan(half):
        return "one seed"
    lo, hi = diff - half, diff + half
    if (claim_sign < 0 and hi < 0) or (claim_sign > 0 and lo > 0):
        return "reproduced"
    if (claim_sign < 0 and lo > 0) or (claim_sign > 0 and hi < 0):
        return "contradicted"
    return "inside noise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--init-method", default="official")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--analysis-data", default="data/demo/validation_text_document")
    ap.add_argument("--out-dir", default="runs/matched")
    ap.add_argument("--output", default="benchmarks/results/matched-init.md")
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--seed-major", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="tables from the finished runs only (implies --skip-existing; trains nothing)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.skip_existing = args.skip_existing or args.report_only
    os.chdir(ROOT)
    runs: dict[str, list[dict]] = {}
    # variants outermost (cheapest first: a partial study has every seed of the variants it
    # reached) or, with --seed-major, seeds outermost (paired differences at every seed reached)
    order = [(n, s) for s in args.seeds for n in args.variants] if args.seed_major else \
        [(n, s) for n in args.variants for s in args.seeds]
    for name, seed in order:
        if True:
            family, extra = VARIANTS[name]
            sets = extra if any(s.startswith("model.init_method=") for s in extra) else \
                extra + [f"model.init_method={args.init_method}"]
            tag = name.split(" (")[0].replace(" ", "-")
            if args.report_only and final_record(os.path.join(args.out_dir, f"{tag}-seed{seed}")) is None:
                continue   # not finished: left out of the tables
            r = train(f"{tag}-seed{seed}", family, args, sets + [f"train.seed={seed}"],
                      run_dir=os.path.join(args.out_dir, f"{tag}-seed{seed}"))
            cached = os.path.join(r["run_dir"], "full_eval.json")
            if args.skip_existing and os.path.exists(cached):
                r["full"], r["eval_command"] = json.load(open(cached))
            else:
                r["full"], r["eval_command"] = megaponder_eval(r["run_dir"], args)
                json.dump([r["full"], r["eval_command"]], open(cached, "w"))
            r["seed"] = seed
            runs.setdefault(name, []).append(r)
            with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
                json.dump({"steps": args.steps, "seeds": args.seeds, "init_method": args.init_method,
                           "runs": runs}, f, indent=1)
    base = {r["seed"]: r["full"]["ppl"] for r in runs.get("vanilla", [])}
    tokens = args.steps * 8 * 128
    md = [f"Tiny configs (d=128, 2 layers unless noted, seq 128, micro-batch 8), {args.steps} steps = "
          f"{tokens:,} training tokens per run, seeds {', '.join(map(str, args.seeds))}, "
          f"init_method `{args.init_method}` for every variant unless its name says otherwise, "
          f"train.threads={args.threads}; perplexity of `megaponder eval` on the whole demo validation split. "
          "95% intervals: Student t over the seeds; Δ vs vanilla paired by seed.", "",
          "| variant | seeds | val ppl per seed | mean ± 95% | Δ vs vanilla (paired) ± 95% | passes/token | flops_ratio |",
          "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        ppl = [r["full"]["ppl"] for r in rs]
        m, h = mean_ci(ppl)
        diffs = [r["full"]["ppl"] - base[r["seed"]] for r in rs if r["seed"] in base]
        dm, dh = mean_ci(diffs) if diffs and name != "vanilla" else (float("nan"), float("nan"))
        md.append(f"| {name} | {len(rs)} | {', '.join(f'{p:.2f}' for p in ppl)} | {m:.2f} ± {h:.2f} | "
                  + ("–" if name == "vanilla" else f"{dm:+.2f} ± {dh:.2f}")
                  + f" | {rs[0]['full']['mean_iters']:.2f} | {rs[0]['full']['flops_ratio']:.2f} |")
    by = {name: {r["seed"]: r["full"]["ppl"] for r in rs} for name, rs in runs.items()}
    md += ["", "### Paper claims at this scale (paired by seed; 'reproduced' / 'contradicted' need the 95% "
           "interval of the difference to exclude 0)", "",
           "| claim | variant − reference (ppl) ± 95% | verdict |", "|---|---|---|"]
    for variant, ref, sign, text in CLAIMS:
        if variant not in by or ref not in by:
            continue
        diffs = [by[variant][s] - by[ref][s] for s in by[variant] if s in by[ref]]
        if not diffs:
            continue
        dm, dh = mean_ci(diffs)
        v = verdict(dm, dh, sign) if sign else ("differs" if not math.isnan(dh) and abs(dm) > dh else "inside noise")
        md.append(f"| {text} | {variant} − {ref}: {dm:+.2f} ± {dh:.2f} (n={len(diffs)}) | {v} |")
    md += ["", "### Commands", "", "```",
           f"python benchmarks/bench_matched_init.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
           f"--out-dir {args.out_dir} --output {args.output}"]
    md += [r["command"] for rs in runs.values() for r in rs][:3] + ["..."] + \
          [r["eval_command"] for rs in runs.values() for r in rs][:1] + ["```"]
    text = ("\n".join(md) + "\n").replace(ROOT + os.sep, "")
    with open(args.output, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
