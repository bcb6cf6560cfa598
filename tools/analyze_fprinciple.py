#!/usr/bin/env python
"""Frequency-Principle diagnostic over a training run (filtering method, docs/analysis.md).

    python tools/analyze_fprinciple.py --run runs/quickstart \\
        --data data/demo/validation_text_document [--samples 1000] [--context 3] [--output fp.json]

Loads every checkpoint of the run (train with --set train.save_every=N to have several),
probes the same validation positions with each, and prints the low- and high-frequency
relative errors per step and kernel width delta. The F-Principle predicts that e_low falls
well before e_high.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        raise SystemExit(f"{run_dir} has no checkpoints/ folder; is it a megaponder run directory?")
    tags = [t for t in os.listdir(root) if re.fullmatch(r"global_step\d+", t)]
    tags.sort(key=lambda t: int(t[len("global_step"):]))
    if not tags:
        raise SystemExit(f"{root} holds no complete checkpoint")
    return [os.path.join(root, t) for t in tags]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: use all its checkpoints")
    src.add_argument("--checkpoints", nargs="+", help="explicit checkpoint folders, in training order")
    p.add_argument("--data", required=True, help="indexed-dataset prefix to probe (validation split)")
    p.add_argument("--samples", type=int, default=1000, help="probe positions N (cost ~ N^2 |V|)")
    p.add_argument("--context", type=int, default=3, help="tokens of context in the probe input x")
    p.add_argument("--reference", default=None,
                   help="checkpoint whose input embeddings define x (default: the last one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)

    from megaponder.analysis.fprinciple import fprinciple_over_checkpoints

    checkpoints = run_checkpoints(args.run) if args.run else args.checkpoints
    result = fprinciple_over_checkpoints(checkpoints, args.data, args.samples, args.context,
                                         args.seed, args.reference, progress=sys.stderr.isatty())
    deltas = result["deltas"]
    print(f"F-Principle filtering diagnostic: N={result['num_samples']} probes, context "
          f"{result['context']} tokens; delta as fractions of the median squared distance")
    header = " | ".join(f"δ={d:.3g}: e_low / e_high" for d in deltas)
    print(f"| step | {header} |\n|---|" + "---|" * len(deltas))
    by_step: dict = {}
    for row in result["rows"]:
        by_step.setdefault(row["step"], {})[row["delta"]] = row
    for step, rows in by_step.items():
        cells = " | ".join(f"{rows[d]['e_low']:.3f} / {rows[d]['e_high']:.3f}" for d in deltas)
        print(f"| {step} | {cells} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
