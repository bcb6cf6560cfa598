#!/usr/bin/env python
"""Offline lm-eval tasks on the quickstart AdaPonderLM against a vanilla model of the same
budget (same shape, data order, seed, tokens and optimizer schedule: examples/configs/quickstart.yml
with ``model.family=vanilla``), with the mean iterations and inference FLOPs ratio of the scored
tokens.

    python benchmarks/bench_lm_eval.py [--steps 400] [--out-dir runs] [--limit N] \
        [--output benchmarks/results/lm_eval.md]

Each family trains through ``megaponder train`` into ``<out-dir>/qs-<family>`` (skipped when
``checkpoints/global_step<steps>`` exists); ``--steps`` below 400 stops both runs at that step
of the unchanged 400-step schedule (``train.exit_at_step``), for a machine too busy for the
full quickstart. Then ``megaponder lm-eval`` runs both offline tasks (megaponder_kjv_cloze,
megaponder_kjv_mc4: every item unless ``--limit``) on both checkpoints and the script writes a
markdown table plus the raw JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("vanilla", "adaponderlm")
TASKS = ("megaponder_kjv_cloze", "megaponder_kjv_mc4")


def _megaponder(*args, log=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "megaponder", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if log:
        with open(log, "w") as f:
            f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"megaponder {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--limit", default=None)
    p.add_argument("--batch-size", default="8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="benchmarks/results/lm_eval.md")
    args = p.parse_args(argv)

    rows = {}
    for family in FAMILIES:
        run = os.path.join(args.out_dir, f"qs-{family}")
        ckpt = os.path.join(run, "checkpoints", f"global_step{args.steps}")
        if not os.path.isdir(ckpt):
            sets = [f"model.family={family}", f"train.run_dir={run}"]
            if args.steps < 400:
                sets.append(f"train.exit_at_step={args.steps}")
            cmd = ["train", "--config", "examples/configs/quickstart.yml"]
            for s in sets:
                cmd += ["--set", s]
            t0 = time.time()
            _megaponder(*cmd, log=os.path.join(args.out_dir, f"qs-{family}.train.log"))
            print(f"{family}: trained in {time.time() - t0:.0f}s", file=sys.stderr)
        cmd = ["lm-eval", "--checkpoint", ckpt, "--tasks", ",".join(TASKS), "--batch_size",
               args.batch_size, "--threads", str(args.threads)]
        if args.limit:
            cmd += ["--limit", args.limit]
        t0 = time.time()
        out = _megaponder(*cmd).stdout
        rows[family] = {**json.loads(out.strip().splitlines()[-1]), "eval_s": round(time.time() - t0, 1)}
        print(f"{family}: lm-eval in {rows[family]['eval_s']}s", file=sys.stderr)

    lines = ["| model | cloze acc | cloze ppl | 4-way MC acc | MC acc_norm | mean iters | inference FLOPs ratio | scored tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for family, r in rows.items():
        c, m = r["tasks"][TASKS[0]], r["tasks"][TASKS[1]]
        lines.append(f"| {family} | {c['acc,none']:.3f} ± {c['acc_stderr,none']:.3f} | "
                     f"{c['perplexity,none']:.1f} | {m['acc,none']:.3f} ± {m['acc_stderr,none']:.3f} | "
                     f"{m['acc_norm,none']:.3f} ± {m['acc_norm_stderr,none']:.3f} | {r['mean_iters']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {r['scored_tokens']} |")
    n = {t: rows[FAMILIES[0]]["tasks"][t]["sample_len"] for t in TASKS}
    text = (f"# Offline lm-eval tasks: quickstart AdaPonderLM vs vanilla\n\n"
            f"`python benchmarks/bench_lm_eval.py --steps {args.steps}"
            f"{' --limit ' + args.limit if args.limit else ''}` — both models at step {args.steps} "
            f"of examples/configs/quickstart.yml's 400-step schedule ({args.steps * 8 * 128:,} "
            f"training tokens); items: cloze {n[TASKS[0]]}, MC {n[TASKS[1]]}; zero-shot.\n\n"
            + "\n".join(lines) + "\n\n```json\n"
            + "\n".join(json.dumps({"family": f, **r}) for f, r in rows.items()) + "\n```\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
