#!/usr/bin/env python
"""Quality study at equal steps (issue 3, "Training" and "The gates learn something").

Trains every family through the real ``megaponder train`` CLI on the tiny configs
(examples/configs/tiny-<family>.yml: d=128, 2 layers, seq 128, micro-batch 8, seed 1234) with
the same data, seed and number of steps, then

1. the quality table: validation ppl, mean iterations/token and inference FLOPs ratio (both
   measured on the validation batches, docs/families.md "FLOPs convention"), training tokens,
   wall-time ratio vs vanilla (training steps only, same thread count);
2. the iso-FLOPs table: AdaPonderLM vs fixed_pruning (uniform, geometric) and random_halting,
   each with ``ponder.target_mean_iters`` = the trained AdaPonderLM's measured validation
   ``mean_iters`` (backbone passes per token, the papers' iso-FLOPs scale);
3. seed noise: vanilla (and AdaPonderLM) retrained with other ``train.seed`` values; every run
   is also evaluated on the whole validation split (``megaponder eval``, the same 48,640 tokens
   for all runs), the first ppl column;
4. the depth-vs-difficulty analysis (tools/analyze_depth.py) of the AdaPonderLM and PonderLM-3
   checkpoints on the demo validation split.

    python benchmarks/bench_quality.py --steps 200 --threads 1 \
        --out-dir runs/quality --output benchmarks/results/quality.md

Runs run one at a time (the machine is shared); ``--skip-existing`` reuses finished runs
(a run dir whose metrics.jsonl ends with the final validation record).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _configs import ROOT, write_report  # noqa: E402  (benchmarks/_configs.py)

BIN = os.path.join(ROOT, ".venv", "bin")
MEGAPONDER = os.path.join(BIN, "megaponder") if os.path.exists(os.path.join(BIN, "megaponder")) else "megaponder"
PYTHON = os.path.join(BIN, "python") if os.path.exists(os.path.join(BIN, "python")) else sys.executable

FAMILIES = ["vanilla", "loop", "pause", "ponderlm", "adaponderlm", "ponderlm2", "ponderlm3"]
CONFIG = {"vanilla": "tiny.yml"}


def config_path(family: str) -> str:
    return os.path.join("examples", "configs", CONFIG.get(family, f"tiny-{family}.yml"))


def final_record(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    recs = [json.loads(line) for line in open(path) if line.strip()]
    if not recs or "val_ppl" not in recs[-1] or "val_flops_ratio" not in recs[-1]:
        return None
    train_recs = [r for r in recs if "loss" in r]
    return {"final": recs[-1], "last_train": train_recs[-1] if train_recs else None,
            "first_train": train_recs[0] if train_recs else None}


def train(name: str, family: str, args, extra: list[str], run_dir: str = None) -> dict:
    run_dir = run_dir or os.path.join(args.out_dir, name)
    sets = [f"train.run_dir={run_dir}", f"train.steps={args.steps}", "train.eval_every=0",
            f"train.eval_batches={args.eval_batches}", "train.save_every=0", "train.progress_bar=false",
            "train.overwrite=true",  # a re-run (without --skip-existing) trains afresh
            f"train.log_every={max(1, args.steps // 10)}"]
    if args.threads:
        sets.append(f"train.threads={args.threads}")
    sets += extra
    cmd = [MEGAPONDER, "train", "--config", config_path(family)]
    for s in sets:
        cmd += ["--set", s]
    rec = final_record(run_dir) if args.skip_existing else None
    if rec is None:
        print(f"[bench_quality] {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
        print(f"[bench_quality] {name}: done in {time.time() - t0:.0f} s", flush=True)
        rec = final_record(run_dir)
        if rec is None:
            raise RuntimeError(f"{run_dir}: no final validation record")
    else:
        print(f"[bench_quality] {name}: reusing {run_dir}", flush=True)
    fin, last, first = rec["final"], rec["last_train"], rec["first_train"]
    return {"name": name, "family": family, "run_dir": run_dir, "command": " ".join(shlex.quote(c) for c in cmd),
            "val_ppl": fin["val_ppl"], "val_loss": fin["val_loss"],
            "mean_iters": fin["val_mean_iters"], "flops_ratio": fin["val_flops_ratio"],
            "tokens": fin["tokens"], "train_time_s": last["time_s"] if last else fin["time_s"],
            "first_loss": first["loss"] if first else None, "last_loss": last["loss"] if last else None,
            "train_mean_iters": last.get("mean_iters") if last else None,
            "train_active": {k: v for k, v in (last or {}).items() if k.startswith("active_frac/")}}


LATENT_FAMILIES = ("ponderlm2", "ponderlm3")


def megaponder_eval(run_dir: str, args, *extra: str) -> tuple[dict, str]:
    """``megaponder eval`` on every window of the validation split: its JSON and its command."""
    cmd = [MEGAPONDER, "eval", "--checkpoint", run_dir, "--data", args.analysis_data, "--threads",
           str(args.threads or 0), *extra]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1]), \
        " ".join(shlex.quote(c) for c in cmd)


def eval_renormalized(run_dir: str, args) -> dict:
    """What ``megaponder eval`` computes (every window, exact mode), with the PonderLM-3
    inference option ``ponder.renormalize_pruned`` switched on in the loaded checkpoint (the
    CLI has no switch for it; the weights are the trained ones)."""
    sys.path.insert(0, ROOT)
    import torch

    from megaponder import load_model
    from megaponder.data import IndexedDataset
    from megaponder.train.checkpoint import read_checkpoint_config, resolve_checkpoint
    from megaponder.train.evaluate import evaluate, sequential_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_checkpoint(run_dir)
    model = load_model(folder)
    model.ponder_cfg.renormalize_pruned = True
    seq = read_checkpoint_config(folder).data.seq_length  # megaponder eval's default length
    return evaluate(model, sequential_batches(IndexedDataset(args.analysis_data), seq, 8))


def full_eval(run: dict, args) -> None:
    """Score a run on the whole validation split (the same tokens for every run; the trainer's
    final validation samples batches with the run's seed). PonderLM-2/3 are scored again in the
    official code's mode (3 Jacobi passes, the number its authors report) besides the default
    exact mode (Jacobi to tolerance, the sequential chain the decoder computes), and PonderLM-3
    once more with its mixture renormalised over the kept steps (an inference-only choice)."""
    run["full"], run["eval_command"] = megaponder_eval(run["run_dir"], args)
    if run["family"] in LATENT_FAMILIES:
        run["full_official"], run["eval_command_official"] = megaponder_eval(
            run["run_dir"], args, "--eval-mode", "official")
    if run["family"] == "ponderlm3":
        run["full_renormalized"] = eval_renormalized(run["run_dir"], args)


def training_flops_per_token(run_dir: str, seq_len: int = 128) -> float:
    """Analytic dense training FLOPs per token (megaponder/models/flops.py, fwd+bwd = 3x fwd)."""
    sys.path.insert(0, ROOT)
    from megaponder import load_model
    from megaponder.models.flops import training_flops_per_token as tfpt

    return tfpt(load_model(run_dir), seq_len)


def analyze(run: dict, args) -> dict:
    out = os.path.join(os.path.dirname(run["run_dir"]), f"depth-{run['name']}.json")
    cmd = [PYTHON, "tools/analyze_depth.py", "--checkpoint", run["run_dir"], "--data", args.analysis_data,
           "--windows", str(args.analysis_windows), "--seq-length", "128", "--compare-full-depth",
           "--output", out]
    print(f"[bench_quality] depth analysis: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    res = json.load(open(os.path.join(ROOT, out) if not os.path.isabs(out) else out))
    res["command"] = " ".join(shlex.quote(c) for c in cmd)
    res["run"] = run["name"]
    return res


def fmt_table(runs: list[dict], vanilla_time: float, vanilla_train_flops: float) -> str:
    lines = ["| run | family | val ppl (full split) | val ppl (trainer) | mean_iters (passes/token, papers' scale) | "
             "flops_ratio (inference, head+embedding incl.) | "
             "training FLOPs ratio | training tokens | wall-time ratio vs vanilla |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r.get("full", {})
        lines.append(f"| {r['name']} | {r['family']} | {f.get('ppl', float('nan')):.2f} | {r['val_ppl']:.2f} | "
                     f"{f.get('mean_iters', r['mean_iters']):.3f} | {f.get('flops_ratio', r['flops_ratio']):.3f} | "
                     f"{r['train_flops_per_token'] / vanilla_train_flops:.2f} | "
                     f"{r['tokens']:,} | {r['train_time_s'] / vanilla_time:.2f} |")
    return "\n".join(lines)


def fmt_eval_modes(runs: list[dict]) -> str:
    lines = ["| run | eval mode | val ppl (full split) | Δ ppl vs exact | Jacobi passes per batch | "
             "largest change of a thought in the last pass | passes/token (papers' scale) | "
             "flops_ratio (inference) |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        exact = r["full"]
        rows = [("exact", exact), ("official", r["full_official"])]
        if "full_renormalized" in r:
            rows.append(("exact, renormalize_pruned=true", r["full_renormalized"]))
        for mode, f in rows:
            delta = f"{f['ppl'] - exact['ppl']:+.4f}" if f is not exact else ""
            resid = f"{f['jacobi_residual']:.1e}" if "jacobi_residual" in f else "–"
            lines.append(f"| {r['name']} | {mode} | {f['ppl']:.3f} | {delta} | {f['jacobi_passes']:.2f} | "
                         f"{resid} | {f['mean_iters']:.3f} | {f['flops_ratio']:.3f} |")
    return "\n".join(lines)


def fmt_depth(res: dict) -> str:
    lines = [f"**{res.get('run', res['family'])}** ({res['tokens']:,} tokens, {res['windows']} windows of {res['seq_length']}, "
             f"iterations = {res['iteration_kind']}): mean NLL {res['mean_nll']:.3f}, mean iterations "
             f"{res['mean_iterations']:.3f}", "",
             f"- corr(NLL, iterations): Pearson r = {res['pearson']:.4f}, Spearman ρ = {res['spearman']:.4f}"]
    if "expected_steps" in res:
        e = res["expected_steps"]
        lines.append(f"- corr(NLL, expected steps 1+Σw): Pearson r = {e['pearson']:.4f}, Spearman ρ = "
                     f"{e['spearman']:.4f} (mean expected steps {e['mean']:.3f})")
    if "entropy" in res:
        e = res["entropy"]
        lines.append(f"- corr(predictive entropy, iterations): Pearson r = {e['pearson']:.4f}, "
                     f"Spearman ρ = {e['spearman']:.4f}")
    full = "mean_nll_full_depth" in res
    if full:
        lines.append(f"- halting switched off (tau=0): mean NLL {res['mean_nll_full_depth']:.4f}, i.e. halting "
                     f"costs {res['delta_nll_halting']:+.4f} nats/token")
    lines += ["", "| exit iteration | tokens | share | mean NLL | mean entropy |" + (" mean NLL, tau=0 |" if full else "")
              + " most frequent input tokens |",
              "|---|---|---|---|---|" + ("---|" if full else "") + "---|"]
    for row in res["per_iteration"]:
        lines.append(f"| {row['iterations']} | {row['count']:,} | {row['share']:.3f} | {row['mean_nll']:.3f} | "
                     f"{row.get('mean_entropy', float('nan')):.3f} |"
                     + (f" {row['mean_nll_full_depth']:.3f} |" if full else "")
                     + f" {row.get('top_input_tokens_text', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="train.threads (0: torch default)")
    ap.add_argument("--eval-batches", type=int, default=16, help="final validation micro-batches (x8x128 tokens)")
    ap.add_argument("--families", nargs="*", default=FAMILIES)
    ap.add_argument("--out-dir", default="runs/quality")
    ap.add_argument("--output", default="benchmarks/results/quality.md")
    ap.add_argument("--json", default=None, help="raw results (default: <output>.json)")
    ap.add_argument("--halting-warmup", type=float, nargs=2, default=(0.3, 0.6),
                    help="AdaPonderLM bottom-k warm-up start/end as fractions of --steps")
    ap.add_argument("--analysis-data", default="data/demo/validation_text_document")
    ap.add_argument("--analysis-windows", type=int, default=64)
    ap.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2],
                    help="extra train.seed values for --noise-families (seed-noise estimate)")
    ap.add_argument("--noise-families", nargs="*", default=["vanilla", "adaponderlm"])
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--no-iso", action="store_true")
    ap.add_argument("--no-analysis", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)

    s0, s1 = (int(round(f * args.steps)) for f in args.halting_warmup)
    ada_sets = [f"ponder.halting_warmup_start={s0}", f"ponder.halting_warmup_end={s1}"]
    runs = []
    for fam in args.families:
        runs.append(train(fam, fam, args, ada_sets if fam == "adaponderlm" else []))
    by_name = {r["name"]: r for r in runs}

    iso = []
    if not args.no_iso and "adaponderlm" in by_name:
        # iso-FLOPs on the papers' scale: the same backbone passes per token as the trained
        # AdaPonderLM (the baselines then cost its gate MLPs less on the full flops_ratio scale)
        target = by_name["adaponderlm"]["mean_iters"]
        iso.append(by_name["adaponderlm"])
        for name, fam, extra in [("fixed_pruning-uniform", "fixed_pruning", ["ponder.prune_schedule=uniform"]),
                                 ("fixed_pruning-geometric", "fixed_pruning", ["ponder.prune_schedule=geometric"]),
                                 ("random_halting", "random_halting", [])]:
            iso.append(train(name, fam, args, extra + [f"ponder.target_mean_iters={target:.4f}"]))

    noise = []
    for fam in args.noise_families:
        for seed in args.noise_seeds:
            if fam == "adaponderlm" and seed != args.noise_seeds[-1]:
                continue  # one extra AdaPonderLM seed (its run is 5x vanilla's)
            name = f"{fam}-seed{seed}"
            noise.append(train(name, fam, args, (ada_sets if fam == "adaponderlm" else []) + [f"train.seed={seed}"],
                               run_dir=os.path.join(args.out_dir, "seeds", name)))

    for r in runs + iso[1:] + noise:
        full_eval(r, args)

    depth = []
    if not args.no_analysis:
        for name in ("adaponderlm", "ponderlm3"):
            if name in by_name:
                depth.append(analyze(by_name[name], args))
        for r in noise:
            if r["family"] == "adaponderlm":
                depth.append(analyze(r, args))

    for r in runs + iso[1:] + noise:
        r["train_flops_per_token"] = training_flops_per_token(r["run_dir"])
    ref = by_name.get("vanilla", runs[0])
    vanilla_time, vanilla_train_flops = ref["train_time_s"], ref["train_flops_per_token"]
    md = [f"Equal steps: {args.steps} steps x 8 sequences x 128 tokens, seed 1234, train.threads={args.threads}, "
          "init_method official for every family (one scheme, docs/families.md 'Initialisation'), "
          f"final validation on {args.eval_batches} micro-batches ({args.eval_batches * 8 * 128:,} tokens) of "
          "data/demo/validation_text_document." + (
              f" AdaPonderLM bottom-k warm-up {s0}->{s1} (λ, k_max, tau at their defaults 0.1, 0.1, 1e-4)."
              if "adaponderlm" in args.families + args.noise_families else ""), "",
          "### Quality at equal steps", "", fmt_table(runs, vanilla_time, vanilla_train_flops)]
    if iso:
        md += ["", f"### Iso-FLOPs (target_mean_iters = AdaPonderLM's {iso[0]['mean_iters']:.4f} passes/token)", "",
               fmt_table(iso, vanilla_time, vanilla_train_flops)]
    if noise:
        md += ["", "### Seed noise (same config, other train.seed: init, data order and the trainer's "
               "validation sample change)", "", fmt_table([by_name[f] for f in args.noise_families if f in by_name]
                                                          + noise, vanilla_time, vanilla_train_flops)]
    latent = [r for r in runs + noise if "full_official" in r]
    if latent:
        md += ["", "### PonderLM-2/3: exact vs official evaluation, PonderLM-3 renormalised mixture (same checkpoints, "
               "whole validation split)", "",
               fmt_eval_modes(latent)]
    if depth:
        md += ["", "### Depth vs difficulty (NLL vs iterations used)", ""]
        for res in depth:
            md += [fmt_depth(res), ""]
    md += ["", "### Commands", "", "```"] + [r["command"] for r in runs + iso[1:] + noise] + \
          [r["eval_command"] for r in runs + iso[1:] + noise] + [r["eval_command_official"] for r in latent] + \
          [d["command"] for d in depth] + ["```"]
    text = ("\n".join(md) + "\n").replace(ROOT + os.sep, "")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    write_report(args.output, text, {"runs": runs, "iso": iso, "noise": noise, "depth": depth, "steps": args.steps},
                 args.json)
    print(text)


if __name__ == "__main__":
    main()
