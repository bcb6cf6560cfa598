#!/usr/bin/env python
"""Why the pause baseline trails vanilla in the matched-initialisation study
(benchmarks/results/matched-init.md: 380.9 vs 160.2 ppl after 100 tiny steps).

The pause layout reads token t's prediction at its last pause position, whose input is the
(constant) pause embedding: the token itself reaches that position only through attention,
while a vanilla model reads it at the token's own position, where the token embedding sits in
the residual stream. This script trains, with the matched-init study's settings (tiny
configs, ``model.init_method=official``, same data, steps and seeds, ``megaponder eval`` on the
whole validation split), the variants that separate the possible causes:

* vanilla, and pause with 0, 1 and 3 pause tokens (0 pause tokens is vanilla's layout with
  the pause family's sqrt(d) input scale: the interleaving itself is then the only change);
* ``pause (3 tokens), token in pause inputs``: a diagnostic family registered here (not a
  method of any paper), identical to pause except that every pause position's input is the
  scaled pause embedding plus its token's scaled embedding, so the readout's residual
  stream carries the token as vanilla's does. Same parameters, FLOPs and attention.

For each run it reports the validation perplexity, the last logged training loss (an
evaluation-path error would leave it at vanilla's) and, on the first validation rows, the
attention weight that the readout position puts on its own token in each layer (largest
head; keys of positions t >= 8, where uniform attention would give about 1/(4t)).

    python benchmarks/bench_pause_diagnosis.py --steps 100 --seeds 1234 --threads 1 \\
        --out-dir runs/pause-diagnosis --output benchmarks/results/pause-diagnosis.md

Runs go one at a time; ``--skip-existing`` reuses finished runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _configs import write_report  # noqa: E402
from bench_matched_init import mean_ci  # noqa: E402
from bench_quality import PYTHON, ROOT  # noqa: E402

sys.path.insert(0, ROOT)

DIAGNOSTIC_FAMILY = "pause_token_inputs"

#: name -> (config, extra --set values)
VARIANTS = {
    "vanilla": ("tiny.yml", []),
    "pause (0 tokens)": ("tiny-pause.yml", ["ponder.pause_tokens=0"]),
    "pause (1 token)": ("tiny-pause.yml", ["ponder.pause_tokens=1"]),
    "pause (3 tokens)": ("tiny-pause.yml", []),
    "pause (3 tokens), token in pause inputs": ("tiny-pause.yml", [f"model.family={DIAGNOSTIC_FAMILY}"]),
}


def register_diagnostic_family() -> None:
    """The pause family with the token's scaled embedding added to every pause input."""
    import torch

    from megaponder.models.baselines import PauseLM
    from megaponder.models.spec import family_spec, register_family

    class PauseTokenInputsLM(PauseLM):
        def pause_stage_inputs(self, token_inputs: torch.Tensor) -> list[torch.Tensor]:
            return [p + token_inputs for p in super().pause_stage_inputs(token_inputs)]

    register_family(dataclasses.replace(family_spec("pause"), name=DIAGNOSTIC_FAMILY,
                                        model_cls=PauseTokenInputsLM))


#: run directory <out-dir>/<tag>-seed<seed> of each variant
TAGS = {"vanilla": "vanilla", "pause (0 tokens)": "pause0", "pause (1 token)": "pause1",
        "pause (3 tokens)": "pause3", "pause (3 tokens), token in pause inputs": "pause3-token-inputs"}


def shown(command: str) -> str:
    """A command line as the results files print it (no paths of this checkout)."""
    return command.replace(PYTHON, "python").replace(os.path.abspath(__file__),
                                                     "benchmarks/bench_pause_diagnosis.py")


def megaponder(*argv: str) -> list[str]:
    """A megaponder command line run through this script (which registers the diagnostic
    family first, so train and eval can build it)."""
    return [PYTHON, os.path.abspath(__file__), "--megaponder", *argv]


def train_and_eval(name: str, seed: int, args) -> dict:
    config, extra = VARIANTS[name]
    run_dir = os.path.join(args.out_dir, f"{TAGS[name]}-seed{seed}")
    sets = [f"train.run_dir={run_dir}", f"train.steps={args.steps}", "train.eval_every=0",
            "train.eval_batches=4", "train.save_every=0", "train.progress_bar=false",
            "train.overwrite=true", f"train.log_every={max(1, args.steps // 10)}",
            f"train.threads={args.threads}", "model.init_method=official", f"train.seed={seed}", *extra]
    train_cmd = megaponder("train", "--config", os.path.join("examples", "configs", config),
                           *[a for s in sets for a in ("--set", s)])
    eval_cmd = megaponder("eval", "--checkpoint", run_dir, "--data", args.data,
                          "--threads", str(args.threads))
    result_path = os.path.join(run_dir, "pause-diagnosis.json")
    if args.skip_existing and os.path.exists(result_path):
        return json.load(open(result_path)) | readout_statistics(os.path.join(ROOT, run_dir), args)
    print(f"[pause-diagnosis] {name} seed {seed}", flush=True)
    subprocess.run(train_cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run(eval_cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    ev = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    logs = [json.loads(line) for line in open(os.path.join(ROOT, run_dir, "metrics.jsonl")) if line.strip()]
    train_losses = [r["loss"] for r in logs if "loss" in r]
    result = {"name": name, "seed": seed, "steps": args.steps, "val_ppl": ev["ppl"],
              "train_loss_last": train_losses[-1],
              "train_loss_last3": sum(train_losses[-3:]) / len(train_losses[-3:]),
              "train_command": " ".join(shlex.quote(c) for c in train_cmd),
              "eval_command": " ".join(shlex.quote(c) for c in eval_cmd)}
    json.dump(result, open(os.path.join(ROOT, result_path), "w"), indent=1)
    return result | readout_statistics(os.path.join(ROOT, run_dir), args)


def readout_statistics(run_dir: str, args, rows: int = 8, first: int = 8) -> dict:
    """On the first ``rows`` validation windows, from the trained checkpoint:
    ``own_token_attention``, per layer, the attention weight (largest over heads, mean over
    rows and over the positions t >= ``first``) of the readout position of token t on token
    t's own input position (the readout is the last stage of each token, stage 0 for
    vanilla; GPT-NeoX backbone, the tiny configs); ``pause_grad_ratio``, the norm of the
    training loss's gradient on the pause embedding over the mean norm of the gradient rows
    of the token embeddings that occur in the batch (None without pause positions)."""
    import torch

    from megaponder import load_model
    from megaponder.data import IndexedDataset
    from megaponder.models.latent import repeat_stages
    from megaponder.train.evaluate import sequential_batches

    torch.set_num_threads(args.threads)
    model = load_model(run_dir)
    stages = getattr(model, "num_stages", 1)
    seq = model_seq_length(run_dir)
    tokens = next(iter(sequential_batches(IndexedDataset(os.path.join(ROOT, args.data)), seq, rows)))["tokens"]
    ids = tokens[:, :-1]
    normed = {}
    hooks = [layer.ln_attn.register_forward_hook(lambda m, a, o, i=i: normed.__setitem__(i, o))
             for i, layer in enumerate(model.stack.layers)]
    model.train()   # no dropout in the tiny configs: the training loss's gradient
    model(ids, tokens[:, 1:]).loss.backward()
    for h in hooks:
        h.remove()
    grad_ratio = None
    if getattr(model, "pause_embedding", None) is not None and model.pause_embedding.grad is not None:
        rows_grad = model.embed_in.weight.grad.norm(dim=1)
        grad_ratio = float(model.pause_embedding.grad.norm() / rows_grad[rows_grad > 0].mean())
    b, t = ids.shape
    n = t * stages
    position_ids = repeat_stages(torch.arange(t).view(1, t).expand(b, t), stages)
    readout = torch.arange(t) * stages + stages - 1
    own = torch.arange(t) * stages
    shares = []
    with torch.no_grad():
        for i, layer in enumerate(model.stack.layers):
            attn = layer.attn
            qkv = attn.qkv(normed[i].detach()).view(b, n, attn.num_heads, 3 * attn.head_dim).transpose(1, 2)
            q, k, _ = qkv.chunk(3, dim=-1)
            cos, sin = attn.rotary.cos_sin(position_ids, q.dtype)
            q, k = attn.rotary.rotate(q, cos, sin), attn.rotary.rotate(k, cos, sin)
            scores = (q[:, :, readout] @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)   # [B, H, T, n]
            causal = torch.arange(n).view(1, n) <= readout.view(t, 1)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            on_own = weights[:, :, torch.arange(t), own]                                 # [B, H, T]
            shares.append(float(on_own[:, :, first:].mean(dim=(0, 2)).max()))
    return {"own_token_attention": shares, "pause_grad_ratio": grad_ratio}


def model_seq_length(run_dir: str) -> int:
    from megaponder.train.checkpoint import read_checkpoint_config, resolve_checkpoint

    return read_checkpoint_config(resolve_checkpoint(run_dir)).data.seq_length


def report(results: list[dict], args) -> str:
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    vanilla = {r["seed"]: r for r in by_name.get("vanilla", [])}
    lines = [f"# Pause baseline against vanilla at {args.steps} tiny steps (generated by "
             "benchmarks/bench_pause_diagnosis.py; the reading is in matched-init.md, \"Pause\")", "",
             f"Tiny configs (d=128, 2 layers, seq 128, micro-batch 8), {args.steps} steps = "
             f"{args.steps * 1024:,} training tokens per run, init_method `official`, "
             f"train.threads={args.threads}; perplexity of `megaponder eval` on the whole demo "
             "validation split (unigram model: 424.9). Own-token attention: the weight the "
             "readout position puts on its token's input position, per layer (largest head, "
             "positions t >= 8 of the first 8 validation windows; uniform attention would give "
             "about 1/((n+1)(t+1)), under 0.03 here). Pause-embedding gradient: the norm of the "
             "training loss's gradient on the pause embedding over the mean norm of the token "
             "embeddings' gradient rows (tokens of the batch), same windows, trained model.", "",
             "| variant | seed | val ppl | Δ vs vanilla (same seed) | last train loss (mean of last 3 logs) | own-token attention, layer 0 / 1 | pause-embedding gradient / token row's |",
             "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        for r in sorted(by_name.get(name, []), key=lambda r: args.seeds.index(r["seed"])):
            ref = vanilla.get(r["seed"])
            delta = f"{r['val_ppl'] - ref['val_ppl']:+.2f}" if ref and name != "vanilla" else "–"
            att = " / ".join(f"{a:.3f}" for a in r["own_token_attention"])
            grad = "–" if r["pause_grad_ratio"] is None else f"{r['pause_grad_ratio']:.1f}"
            lines.append(f"| {name} | {r['seed']} | {r['val_ppl']:.2f} | {delta} | "
                         f"{r['train_loss_last']:.3f} ({r['train_loss_last3']:.3f}) | {att} | {grad} |")
    if len(args.seeds) > 1:
        lines += ["", "Over the seeds (95% Student-t intervals; Δ paired by seed):", "",
                  "| variant | seeds | val ppl mean ± 95% | Δ vs vanilla ± 95% | last train loss (mean of last 3 logs), mean |",
                  "|---|---|---|---|---|"]
        for name in VARIANTS:
            runs = by_name.get(name, [])
            if not runs:
                continue
            ppl, half = mean_ci([r["val_ppl"] for r in runs])
            paired = [r["val_ppl"] - vanilla[r["seed"]]["val_ppl"] for r in runs if r["seed"] in vanilla]
            delta = "–" if name == "vanilla" or not paired else "{:+.2f} ± {:.2f}".format(*mean_ci(paired))
            loss = sum(r["train_loss_last3"] for r in runs) / len(runs)
            lines.append(f"| {name} | {len(runs)} | {ppl:.2f} ± {half:.2f} | {delta} | {loss:.3f} |")
    lines += ["", "Commands (first seed of each variant; the others change train.seed and the run "
              "directory only):", "", "```",
              "python benchmarks/bench_pause_diagnosis.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])]
    seen = set()
    for r in results:
        if r["name"] not in seen:
            seen.add(r["name"])
            lines.append(r["train_command"])
    lines.append(results[0]["eval_command"])
    lines.append("```")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--megaponder"]:   # a megaponder command with the diagnostic family known
        register_diagnostic_family()
        from megaponder.cli import main as megaponder_main
        return megaponder_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234])
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="data/demo/validation_text_document")
    ap.add_argument("--out-dir", default="runs/pause-diagnosis")
    ap.add_argument("--output", default=None, help="markdown table (and the JSON next to it)")
    ap.add_argument("--skip-existing", action="store_true")
    args = ap.parse_args(argv)
    register_diagnostic_family()   # readout_attention loads its checkpoints here
    results = [train_and_eval(name, seed, args) for seed in args.seeds for name in args.variants]
    for r in results:
        r["train_command"], r["eval_command"] = shown(r["train_command"]), shown(r["eval_command"])
    text = report(results, args)
    print(text)
    if args.output:
        write_report(args.output, text, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
