#!/usr/bin/env python
"""F-Principle measurements behind BENCHMARKS.md (docs/analysis.md explains each one).

    python benchmarks/bench_fprinciple.py --out-dir runs/fprinciple --output benchmarks/results/fprinciple.md

1. ``megaponder fprinciple 1d --init both`` and ``digits --init both`` (MLP): the toy
   reproductions, small vs large initialisation.
2. Tiny vanilla model (examples/configs/tiny.yml, --vanilla-steps 200) with the in-training probe every
   10 steps: e_low / e_high per δ beside the unigram, bigram and step-0 baselines.
3. The quickstart (examples/configs/quickstart.yml: AdaPonderLM, 400 steps; ``--quickstart-exit``,
   default 150, stops it early with the same schedule) with the probe at
   the documented interval (analysis.fprinciple_every=50): the probe's share of the wall time
   (its own logged seconds / the run's wall time, both under the same machine load), then the
   per-iteration view of its final checkpoint.
4. Tiny PonderLM (--steps): per-iteration view; tiny PonderLM-2 with ponder.steps = 1 and 3
   (--steps): e_low / e_high against the number of Jacobi passes J = 0..4 of the final checkpoint.

Runs one at a time with one thread each (the machine is shared); ``--skip-existing`` reuses
finished runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sh(args: list[str], log: str) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("+", " ".join(args), flush=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "megaponder", *args], check=True, cwd=ROOT, env=env,
                       stdout=f, stderr=subprocess.STDOUT)


def finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return bool(rows) and "val_ppl" in rows[-1] and "loss" not in rows[-1]


def train(config: str, run_dir: str, steps: int, every: int, skip: bool, extra=()) -> None:
    if skip and finished(run_dir):
        return
    sets = [f"train.run_dir={run_dir}", f"train.steps={steps}", f"analysis.fprinciple_every={every}",
            "train.threads=1", "train.progress_bar=false", *extra]
    args = ["train", "--config", os.path.join(ROOT, "examples", "configs", config)]
    for s in sets:
        args += ["--set", s]
    sh(args, os.path.join(run_dir + ".log"))


def curve_table(run_dir: str) -> tuple[str, dict]:
    from megaponder.analysis.fprinciple_cli import format_rows

    probe = json.load(open(os.path.join(run_dir, "fprinciple_probe.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    fr = probe["delta_fractions"]
    table = [(f"baseline: {k}", v) for k, v in probe["baselines"].items() if k != "step0"]
    curve, seconds = [], []
    for r in rows:
        if "fprinciple/seconds" in r:
            seconds.append(r["fprinciple/seconds"])
            cells = [{"fraction": f, "e_low": r[f"fprinciple/e_low/d={f:g}"],
                      "e_high": r[f"fprinciple/e_high/d={f:g}"]} for f in fr]
            curve.append((f"step {r['step']}" + (" (init)" if r["step"] == 0 else ""), cells))
    wall = [r["time_s"] for r in rows if "val_ppl" in r and "loss" not in r][-1]
    plot_curve(run_dir, probe, curve)
    return format_rows(table + curve), {"probe_seconds": seconds, "wall_s": wall, "probe": probe}


def plot_curve(run_dir: str, probe: dict, curve: list) -> str:
    """e_low / e_high per δ over training beside the baselines: run_dir/fprinciple_curve.png."""
    from megaponder.analysis.fprinciple_plots import plot_lm_curves

    steps = [int(label.split()[1]) for label, _ in curve]
    base = {k: v for k, v in probe["baselines"].items() if k != "step0"}
    return plot_lm_curves({"model": {"x": steps, "rows": [cells for _, cells in curve], "xlabel": "step"}},
                          base, os.path.join(run_dir, "fprinciple_curve.png"),
                          title=f"in-training probe: {os.path.basename(run_dir)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/fprinciple")
    p.add_argument("--output", default="benchmarks/results/fprinciple.md")
    p.add_argument("--steps", type=int, default=100, help="steps of the tiny PonderLM / PonderLM-2 runs")
    p.add_argument("--vanilla-steps", type=int, default=200, help="steps of the tiny vanilla run")
    p.add_argument("--quickstart-exit", type=int, default=150,
                   help="stop the quickstart at this step (train.exit_at_step; the schedule still "
                        "spans 400 steps), to measure the probe's share on a shorter run")
    p.add_argument("--skip-existing", action="store_true")
    p.add_argument("--parts", default="toy,vanilla,quickstart,ponder")
    args = p.parse_args()
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    parts = set(args.parts.split(","))
    report = ["# F-Principle measurements", "", "Produced by `python benchmarks/bench_fprinciple.py "
              + " ".join(sys.argv[1:]) + "` (one thread per run).", ""]
    if "toy" in parts:
        for exp in ("1d", "digits"):
            log = os.path.join(out, f"{exp}.log")
            sh(["fprinciple", exp, "--init", "both", "--out", os.path.join(out, exp)], log)
            report += [f"## `megaponder fprinciple {exp} --init both`", "", "```", open(log).read().strip(), "```", ""]
    if "vanilla" in parts:
        run = os.path.join(out, "tiny")
        train("tiny.yml", run, args.vanilla_steps, 10, args.skip_existing, ["train.eval_every=0"])
        table, info = curve_table(run)
        report += ["## Tiny vanilla, probe every 10 steps", "", table, "",
                   f"probe: {len(info['probe_seconds'])} runs, mean {sum(info['probe_seconds']) / len(info['probe_seconds']):.2f} s each; "
                   f"build {info['probe']['build_seconds']} s; run wall time {info['wall_s']:.0f} s", ""]
    if "quickstart" in parts:
        run = os.path.join(out, "quickstart")
        train("quickstart.yml", run, 400, 50, args.skip_existing, [f"train.exit_at_step={args.quickstart_exit}"])
        table, info = curve_table(run)
        share = sum(info["probe_seconds"]) / info["wall_s"]
        report += [f"## Quickstart (AdaPonderLM), first {args.quickstart_exit} of 400 steps, probe every 50 steps",
                   "", table, "",
                   f"cost: {len(info['probe_seconds'])} probes, {sum(info['probe_seconds']):.1f} s of "
                   f"{info['wall_s']:.0f} s wall time = {100 * share:.1f}% (+ {info['probe']['build_seconds']} s "
                   f"building the probe at start-up)", ""]
        log = os.path.join(out, "quickstart-iter.log")
        sh(["fprinciple", "lm", "--run", run, "--per-iteration", "--threads", "1", "--out", run + "-iter"], log)
        report += ["### Per pondering iteration (`megaponder fprinciple lm --run ... --per-iteration`)", "",
                   "```", open(log).read().strip(), "```", ""]
    if "ponder" in parts:
        run = os.path.join(out, "tiny-ponderlm")
        train("tiny-ponderlm.yml", run, args.steps, 50, args.skip_existing, ["train.eval_every=0"])
        log = os.path.join(out, "ponderlm-iter.log")
        sh(["fprinciple", "lm", "--run", run, "--per-iteration", "--threads", "1", "--out", run + "-iter"], log)
        report += ["## Tiny PonderLM: per pondering iteration", "", "```", open(log).read().strip(), "```", ""]
        # K latent steps form a causal (triangular) system: Jacobi reaches its fixed point after
        # at most K passes, so K = 1 (the tiny config) says little; K = 3 shows the approach
        for k in (1, 3):
            run = os.path.join(out, f"tiny-ponderlm2-k{k}")
            train("tiny-ponderlm2.yml", run, args.steps, 50, args.skip_existing,
                  ["train.eval_every=0", f"ponder.steps={k}"])
            log = os.path.join(out, f"ponderlm2-k{k}-jacobi.log")
            sh(["fprinciple", "lm", "--run", run, "--jacobi", "0,1,2,3,4", "--threads", "1",
                "--out", run + "-jacobi"], log)
            report += [f"## Tiny PonderLM-2 (ponder.steps={k}): Jacobi passes", "", "```",
                       open(log).read().strip(), "```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(report) + "\n")
    print("wrote", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
