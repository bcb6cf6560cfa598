"""``megaponder fprinciple {1d,digits,lm}`` (docs/analysis.md).

    megaponder fprinciple 1d     --init small|large|both --out DIR [--steps N]
    megaponder fprinciple digits --init small|large|both --out DIR [--model mlp|cnn] [--steps N]
    megaponder fprinciple lm     --run RUN_DIR --out DIR [--per-iteration] [--jacobi 0,1,2]

``1d`` writes DIR/delta_f.json ({"peaks", "steps", "delta_f"}) and DIR/fprinciple_1d.png for
one init; ``--init both`` writes DIR/small/ and DIR/large/ and puts the two side by side in
DIR/fprinciple_1d.png. Everything else of a run (spectra, fits, losses) is in run.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _inits(choice: str) -> list[str]:
    return ["small", "large"] if choice == "both" else [choice]


def _dump(path: str, obj) -> None:
    from ..safe_files import write_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, json.dumps(obj))  # never through a link planted in --out


def _first_below_summary(steps, curves, threshold=0.1) -> list:
    from .spectral import first_below
    return [first_below(steps, c, threshold) for c in curves]


def _set_threads(n: int) -> None:
    import torch
    if n:
        torch.set_num_threads(n)


def cmd_1d(args) -> int:
    from .fprinciple_plots import plot_1d
    from .fprinciple_toy import run_1d

    _set_threads(args.threads)
    results = []
    for init in _inits(args.init):
        r = run_1d(init, args.steps, every=args.every, seed=args.seed, lr=args.lr)
        folder = args.out if args.init != "both" else os.path.join(args.out, init)
        _dump(os.path.join(folder, "delta_f.json"), {k: r[k] for k in ("peaks", "steps", "delta_f")})
        _dump(os.path.join(folder, "run.json"), r)
        if args.init == "both":
            plot_1d([r], os.path.join(folder, "fprinciple_1d.png"))
        results.append(r)
        print(f"init {init} (σ={r['init_std']:g}): peaks {r['peaks']}, first step with Δ_F < 0.1: "
              f"{_first_below_summary(r['steps'], r['delta_f'])}, final Δ_F "
              f"{[round(c[-1], 4) for c in r['delta_f']]}, MSE on the 4x finer grid "
              f"{r['test_mse_fine_grid']:.4f} ({r['wall_s']:.1f} s)")
    print("wrote", plot_1d(results, os.path.join(args.out, "fprinciple_1d.png")))
    return 0


def cmd_digits(args) -> int:
    from .fprinciple_plots import plot_digits
    from .fprinciple_toy import run_digits

    _set_threads(args.threads)
    results = []
    for init in _inits(args.init):
        r = run_digits(init, args.steps, model=args.model, n=args.samples, every=args.every,
                       seed=args.seed, lr=args.lr)
        results.append(r)
        print(f"{args.model}, init {init} (σ={r['init_std']:g}), {r['n']} images, "
              f"train accuracy {r['train_accuracy'][-1]:.3f} ({r['wall_s']:.1f} s)")
        for f in r["filtering"]:
            lo, hi = _first_below_summary(r["steps"], [f["e_low"], f["e_high"]])
            print(f"  filtering δ={f['fraction']:g}·median: first step below 0.1: e_low {lo}, e_high {hi}; "
                  f"final {f['e_low'][-1]:.3f} / {f['e_high'][-1]:.3f}")
        pr = r["projection"]
        print(f"  projection peaks k={[round(k, 3) for k in pr['peak_freqs']]}: first step with "
              f"Δ_F < 0.1: {_first_below_summary(r['steps'], pr['delta_f'])}")
    _dump(os.path.join(args.out, "digits.json"), results)
    print("wrote", plot_digits(results, os.path.join(args.out, f"fprinciple_digits_{args.model}.png")))
    return 0


def run_checkpoints(run_dir: str) -> list[str]:
    """Every complete checkpoint of a run directory, in step order."""
    from ..train.checkpoint import tag_step

    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        raise SystemExit(f"{run_dir} has no checkpoints/ folder; is it a megaponder run directory?")
    tags = sorted((t for t in os.listdir(root) if tag_step(t) is not None), key=tag_step)
    if not tags:
        raise SystemExit(f"{root} holds no complete checkpoint")
    return [os.path.join(root, t) for t in tags]


def format_rows(title_rows: list[tuple[str, list[dict]]]) -> str:
    """Markdown table: one row per (label, rows per δ), cells 'e_low / e_high'."""
    fracs = [r["fraction"] for r in title_rows[0][1]]
    out = ["| | " + " | ".join(f"δ={f:g}·med" for f in fracs) + " |", "|---|" + "---|" * len(fracs)]
    for label, rows in title_rows:
        out.append(f"| {label} | " + " | ".join(f"{r['e_low']:.3f} / {r['e_high']:.3f}" for r in rows) + " |")
    return "\n".join(out)


def cmd_lm(args) -> int:
    from ..train.checkpoint import load_model, read_checkpoint_config
    from .fprinciple import fprinciple_over_checkpoints, iteration_distributions, jacobi_distributions, probe_for_run
    from .fprinciple_plots import plot_lm_curves

    _set_threads(args.threads)
    checkpoints = run_checkpoints(args.run) if args.run else args.checkpoints
    t0 = time.time()
    last = checkpoints[-1]
    cfg = read_checkpoint_config(last)
    probe = probe_for_run(cfg, args.data, args.probes, args.context, args.seed, args.scan_tokens, args.reference)
    result = fprinciple_over_checkpoints(checkpoints, probe, progress=sys.stderr.isatty())
    by_step: dict = {}
    for row in result["rows"]:
        by_step.setdefault(row["step"], []).append(row)
    print(f"F-Principle LM probe: {result['num_probes']} distinct training contexts of "
          f"{result['context']} tokens ({result['scanned_tokens']:,} tokens scanned, mean "
          f"{result['probe_counts_mean']:.1f} occurrences per context), δ as fractions of the "
          f"median squared distance {result['median_sq_distance']:.3f}; cells e_low / e_high")
    table = [(f"baseline: {k}", v) for k, v in result["baselines"].items()]
    table += [(f"step {s}" + (" (init)" if s == 0 else ""), rows) for s, rows in by_step.items()]
    print(format_rows(table))
    curves = {"model": {"x": list(by_step), "rows": list(by_step.values()), "xlabel": "step"}}

    if args.per_iteration or args.jacobi:
        model = load_model(last)
        if args.per_iteration:
            dists = iteration_distributions(model, probe.contexts, cfg.model.vocab_size)
            rows = [probe.errors(d) for d in dists]
            result["per_iteration"] = {"checkpoint": last, "rows": rows}
            print(f"\nper pondering iteration ({cfg.model.family}, {last}):")
            print(format_rows([(f"iteration {i + 1}", r) for i, r in enumerate(rows)]))
            curves = {"per iteration": {"x": list(range(1, len(rows) + 1)), "rows": rows,
                                        "xlabel": "pondering iteration"}}
        if args.jacobi:
            passes = [int(j) for j in args.jacobi.split(",")]
            dists = jacobi_distributions(model, probe.contexts, cfg.model.vocab_size, passes)
            rows = {j: probe.errors(d) for j, d in dists.items()}
            result["jacobi"] = {"checkpoint": last, "rows": {str(j): r for j, r in rows.items()}}
            print(f"\nper Jacobi pass count ({cfg.model.family}, {last}):")
            print(format_rows([(f"J={j}", r) for j, r in rows.items()]))
            curves = {"Jacobi": {"x": list(rows), "rows": list(rows.values()), "xlabel": "Jacobi passes J"}}
    result["seconds"] = round(time.time() - t0, 2)
    if args.out:
        _dump(os.path.join(args.out, "fprinciple_lm.json"), result)
        print("wrote", plot_lm_curves(curves, result["baselines"], os.path.join(args.out, "fprinciple_lm.png"),
                                      title=f"LM probe: {cfg.model.family}, "
                                            f"{os.path.basename(os.path.normpath(last))}"))
    return 0


def add_parser(sub) -> None:
    """Register ``megaponder fprinciple`` on the CLI's subparsers."""
    fp = sub.add_parser("fprinciple", help="Frequency-Principle experiments and the LM spectral probe",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = fp.add_subparsers(dest="experiment", required=True)

    def common(p, steps, every):
        p.add_argument("--init", choices=["small", "large", "both"], default="both",
                       help="weight/bias std 0.05 (small) or 1.0 (large); both: side by side")
        p.add_argument("--out", required=True, help="output folder (JSON and PNG)")
        p.add_argument("--steps", type=int, default=steps, help="full-batch Adam steps")
        p.add_argument("--every", type=int, default=every, help="measure every N steps")
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (these networks are small: more threads mostly wait)")

    p = fsub.add_parser("1d", help="sin x + sin 3x + sin 5x: Δ_F at the DFT peaks over training")
    common(p, 1500, 10)
    p.set_defaults(func=cmd_1d)

    p = fsub.add_parser("digits", help="sklearn 8x8 digits: filtering and projection methods")
    common(p, 300, 10)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--samples", type=int, default=None, help="seeded subset of the 1,797 images")
    p.set_defaults(func=cmd_digits)

    p = fsub.add_parser("lm", help="spectral probe of saved checkpoints (+ per-iteration, Jacobi)")
    add_lm_arguments(p)
    p.set_defaults(func=cmd_lm)


def add_lm_arguments(p) -> None:
    """The LM probe's options (shared with tools/analyze_fprinciple.py)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: every checkpoint in it")
    src.add_argument("--checkpoints", nargs="+", help="checkpoint folders, in training order")
    p.add_argument("--data", nargs="+", default=None,
                   help="indexed-dataset prefixes to draw contexts from (default: the run's data.path)")
    p.add_argument("--probes", type=int, default=512, help="distinct contexts N (cost ~ N^2 |V|)")
    p.add_argument("--context", type=int, default=3, help="tokens per context c")
    p.add_argument("--scan-tokens", type=int, default=1_000_000, help="leading tokens scanned")
    p.add_argument("--reference", default=None,
                   help="checkpoint whose input embeddings define x (default: a seeded random table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-iteration", action="store_true",
                   help="also probe each pondering iteration of the last checkpoint (ponderlm, adaponderlm)")
    p.add_argument("--jacobi", default=None, help="also probe the last checkpoint at these Jacobi pass "
                   "counts, e.g. 0,1,2,3 (ponderlm2, ponderlm3)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for fprinciple_lm.json and fprinciple_lm.png")
