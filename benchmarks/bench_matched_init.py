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
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import ROOT, final_record, megaponder_eval, train  # noqa: E402

#: name -> (family whose tiny config is used, extra --set values). The run directory is
#: <out-dir>/<tag>-seed<seed>, tag = the name before " (" unless TAGS names another.
VARIANTS = {
    "vanilla": ("vanilla", []),
    "vanilla 2x depth": ("vanilla", ["model.num_layers=4"]),
    "vanilla small_init_wang": ("vanilla", ["model.init_method=small_init_wang"]),
    "pause (3 tokens)": ("pause", []),
    "loop (K=3)": ("loop", []),
    "ponderlm (K=3)": ("ponderlm", []),
    "adaponderlm (K=3)": ("adaponderlm", []),
    "ponderlm2 (K=1)": ("ponderlm2", []),
    "ponderlm2 (K=2)": ("ponderlm2", ["ponder.steps=2"]),
    # PonderLM-3 frontier points: K_max = 2, compute penalty weight swept
    "ponderlm3 (K=2, penalty 0.01)": ("ponderlm3", []),
    "ponderlm3 (K=2, penalty 0.1)": ("ponderlm3", ["ponder.compute_penalty=0.1"]),
    "ponderlm3 (K=2, penalty 1)": ("ponderlm3", ["ponder.compute_penalty=1.0"]),
}
TAGS = {"ponderlm2 (K=2)": "ponderlm2-k2", "ponderlm3 (K=2, penalty 0.01)": "ponderlm3-p0.01",
        "ponderlm3 (K=2, penalty 0.1)": "ponderlm3-p0.1", "ponderlm3 (K=2, penalty 1)": "ponderlm3-p1"}


def run_tag(name: str) -> str:
    return TAGS.get(name, name.split(" (")[0].replace(" ", "-"))


#: the papers' claims this scale can speak to: (variant, reference, claimed sign of the
#: paired perplexity difference variant - reference, source with the paper's numbers)
CLAIMS = [
    ("ponderlm (K=3)", "vanilla", -1, "PonderLM beats vanilla at equal parameters (PonderLM Table 2: 14.16 vs 16.95 ppl, Pythia-70M, 30B tokens)"),
    ("ponderlm (K=3)", "vanilla 2x depth", -1, "PonderLM matches a vanilla model with ~2x the parameters (PonderLM abstract); tested as 'not worse'"),
    ("ponderlm (K=3)", "loop (K=3)", -1, "PonderLM beats the looped model at equal passes (PonderLM Table 2: 14.16 vs 15.33)"),
    ("ponderlm (K=3)", "pause (3 tokens)", -1, "PonderLM beats pause tokens (PonderLM Table 2: 14.16 vs 16.53)"),
    ("pause (3 tokens)", "vanilla", -1, "pause slightly beats vanilla (PonderLM Table 2: 16.53 vs 16.95)"),
    ("loop (K=3)", "vanilla", -1, "loop beats vanilla (PonderLM Table 2: 15.33 vs 16.95)"),
    ("adaponderlm (K=3)", "vanilla", -1, "AdaPonderLM beats vanilla (AdaPonderLM Table 1 via PonderLM Table 2: 14.32 at 3.8x vs vanilla 16.95, 70M)"),
    ("adaponderlm (K=3)", "ponderlm (K=3)", 0, "AdaPonderLM matches PonderLM with fewer passes (AdaPonderLM Table 1: 14.32 at 3.8x vs 14.40 at 4x, 70M; 9.87 vs 9.72 at 410M)"),
    ("ponderlm2 (K=1)", "vanilla", -1, "PonderLM-2 beats vanilla (PonderLM-2 abstract; no tiny-scale number)"),
    ("ponderlm2 (K=1)", "vanilla 2x depth", -1, "PonderLM-2 (1 thought) beats a vanilla model with 2x the parameters (PonderLM-2 abstract: 1.4B beats Pythia-2.8B; 410M README vs 410m_x2depth)"),
    ("ponderlm2 (K=1)", "loop (K=3)", -1, "PonderLM-2-410M ends below Loop K=3 (PonderLM-2 README, no numbers)"),
    ("ponderlm2 (K=2)", "ponderlm2 (K=1)", -1, "more thoughts per token keep improving (PonderLM-2 abstract, no numbers)"),
    ("ponderlm3 (K=2, penalty 0.01)", "ponderlm2 (K=2)", 0, "PonderLM-3 at K_max matches PonderLM-2 with fewer inference FLOPs (PonderLM-3, 410M: 46.4 vs 46.0 avg acc at 8.86 vs 9.84 FLOPs)"),
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
    ap.add_argument("--merge", nargs="*", default=[],
                    help="earlier results JSONs (this script's --output .json) whose runs are "
                         "taken as they are (same budget and init; a later file wins); their "
                         "(variant, seed) pairs are not trained again")
    ap.add_argument("--frontier", default=None,
                    help="also write the ppl vs inference-FLOPs frontier table (.md) and plot (.png)")
    args = ap.parse_args()
    args.skip_existing = args.skip_existing or args.report_only
    os.chdir(ROOT)
    runs: dict[str, list[dict]] = {}
    for path in args.merge:
        earlier = json.load(open(path))
        if earlier["steps"] != args.steps or earlier["init_method"] != args.init_method:
            sys.exit(f"--merge {path}: {earlier['steps']} steps / init {earlier['init_method']}, "
                     f"not {args.steps} / {args.init_method}; merge only runs of the same budget and init.")
        for name, rs in earlier["runs"].items():
            kept = [r for r in runs.get(name, []) if r["seed"] not in {x["seed"] for x in rs}]
            runs[name] = kept + rs
    merged = {(name, r["seed"]) for name, rs in runs.items() for r in rs}
    # variants outermost (cheapest first: a partial study has every seed of the variants it
    # reached) or, with --seed-major, seeds outermost (paired differences at every seed reached)
    order = [(n, s) for s in args.seeds for n in args.variants] if args.seed_major else \
        [(n, s) for n in args.variants for s in args.seeds]
    for name, seed in order:
        if (name, seed) in merged:
            continue
        family, extra = VARIANTS[name]
        sets = extra if any(s.startswith("model.init_method=") for s in extra) else \
            extra + [f"model.init_method={args.init_method}"]
        tag = run_tag(name)
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
    # table order: VARIANTS order, whatever file a run came from
    runs = {name: sorted(runs[name], key=lambda r: args.seeds.index(r["seed"]) if r["seed"] in args.seeds else 99)
            for name in VARIANTS if name in runs}
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
          "| variant | seeds | val ppl per seed | mean ± 95% | Δ vs vanilla (paired) ± 95% | passes/token (mean) | flops_ratio (mean) |",
          "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        ppl = [r["full"]["ppl"] for r in rs]
        m, h = mean_ci(ppl)
        diffs = [r["full"]["ppl"] - base[r["seed"]] for r in rs if r["seed"] in base]
        dm, dh = mean_ci(diffs) if diffs and name != "vanilla" else (float("nan"), float("nan"))
        md.append(f"| {name} | {len(rs)} | {', '.join(f'{p:.2f}' for p in ppl)} | {m:.2f} ± {h:.2f} | "
                  + ("–" if name == "vanilla" else f"{dm:+.2f} ± {dh:.2f}")
                  + f" | {sum(r['full']['mean_iters'] for r in rs) / len(rs):.2f}"
                  f" | {sum(r['full']['flops_ratio'] for r in rs) / len(rs):.2f} |")
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
        # sign 0: a 'matches' claim (or the init check): 'differs' when the interval excludes 0
        v = verdict(dm, dh, sign) if sign else ("one seed" if math.isnan(dh) else
                                                 "differs" if abs(dm) > dh else "inside noise")
        md.append(f"| {text} | {variant} − {ref}: {dm:+.2f} ± {dh:.2f} (n={len(diffs)}) | {v} |")
    md += ["", "### Commands", "", "```", "# this table (runs trained by earlier invocations of the same script come in by --merge)",
           invocation()]
    md += ["# one training command per variant (its first seed; the other seeds change train.seed "
           "and train.run_dir only), then the eval command of one run"]
    md += [rs[0]["command"] for rs in runs.values()] + \
          [r["eval_command"] for rs in runs.values() for r in rs][:1] + ["```"]
    # the venv of whichever worktree ran it: the same .venv/bin commands
    text = re.sub(r"\S*/\.venv/bin/", ".venv/bin/", ("\n".join(md) + "\n").replace(ROOT + os.sep, ""))
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    if args.frontier:
        write_frontier(runs, args, tokens)


def invocation() -> str:
    """This script's command line as run (relative paths from the repository root)."""
    return "python benchmarks/bench_matched_init.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_frontier(runs: dict[str, list[dict]], args, tokens: int) -> None:
    """Validation perplexity against inference FLOPs (``megaponder eval``'s flops_ratio: the
    model's FLOPs accounting relative to vanilla, docs/families.md "FLOPs convention") for
    every variant: a table sorted by FLOPs, marking the Pareto-optimal points (no other
    variant has lower or equal FLOPs and a lower mean ppl), and a PNG next to it."""
    rows = []
    for name, rs in runs.items():
        if "small_init_wang" in name or "2x depth" in name:
            continue   # another init scheme / another reference of flops_ratio
        m, h = mean_ci([r["full"]["ppl"] for r in rs])
        fr = sum(r["full"]["flops_ratio"] for r in rs) / len(rs)
        it = sum(r["full"]["mean_iters"] for r in rs) / len(rs)
        rows.append((fr, m, h, name, len(rs), it))
    rows.sort()
    pareto = {r[3] for r in rows if not any(o[0] <= r[0] and o[1] < r[1] for o in rows if o is not r)}
    md = [f"Perplexity against inference FLOPs, tiny configs, {args.steps} steps = {tokens:,} training "
          f"tokens per run, seeds {', '.join(map(str, args.seeds))} (per variant: as many as the "
          f"matched-init table lists), init_method `{args.init_method}`; ppl and flops_ratio from "
          "`megaponder eval` on the whole demo validation split (flops_ratio: inference FLOPs per "
          "token relative to vanilla, the model's own accounting; PonderLM-3 after its tau cut).", "",
          f"Command: `{invocation()}`", "",
          "vanilla 2x depth is left out: its flops_ratio is relative to a vanilla model of its own "
          "depth, not to the 2-layer one.", "",
          "| variant | seeds | flops_ratio | passes/token | val ppl mean ± 95% | Pareto-optimal |",
          "|---|---|---|---|---|---|"]
    for fr, m, h, name, n, it in rows:
        md.append(f"| {name} | {n} | {fr:.2f} | {it:.2f} | {m:.2f} ± {h:.2f} | {'yes' if name in pareto else ''} |")
    with open(args.frontier, "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    best = min(r[1] for r in rows)
    shown = [r for r in rows if r[1] <= 1.5 * best]   # a far outlier (tiny-scale pause) is listed, not drawn
    for i, (fr, m, h, name, n, it) in enumerate(shown):
        ax.errorbar(fr, m, yerr=0 if math.isnan(h) else h, fmt="o", capsize=3,
                    color="C3" if name.startswith("ponderlm3") else "C0")
        ax.annotate(name, (fr, m), textcoords="offset points", xytext=(5, 10 if i % 2 else -12), fontsize=7)
    off = [f"{r[3]} ({r[0]:.2f}x, {r[1]:.0f})" for r in rows if r not in shown]
    if off:
        ax.text(0.02, 0.97, "off the chart: " + "; ".join(off), transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per token / vanilla (flops_ratio)")
    ax.set_ylabel("validation ppl (mean over seeds, 95% t interval)")
    ax.set_title(f"tiny configs, {tokens:,} training tokens, init {args.init_method}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.frontier)[0] + ".png", dpi=120)


if __name__ == "__main__":
    main()
