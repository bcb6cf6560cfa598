#!/usr/bin/env python
"""Depth vs difficulty of a trained checkpoint: per-token NLL vs iterations used.

    python tools/analyze_depth.py --checkpoint runs/tiny-adaponderlm \
        --data data/demo/validation_text_document --windows 64 --seq-length 128 \
        --output runs/tiny-adaponderlm/depth.json

Prints Pearson/Spearman correlation between NLL and iterations and the table of counts and
mean NLL per exit iteration; ``--output`` writes the same as JSON. See
megaponder/analysis/depth.py and docs/families.md ("Depth vs difficulty").
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run dir (megaponder.load_model)")
    ap.add_argument("--data", required=True, help="indexed dataset prefix (without .bin/.idx)")
    ap.add_argument("--windows", type=int, default=64, help="non-overlapping windows, in file order")
    ap.add_argument("--seq-length", type=int, default=None, help="window length (default: the run's data.seq_length)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--jacobi-passes", type=int, default=None,
                    help="PonderLM-2/3: Jacobi passes of the parallel forward (default: eval_jacobi_passes)")
    ap.add_argument("--compare-full-depth", action="store_true",
                    help="also run with halting off (ponder.tau=0) and report the NLL each exit group "
                         "would have had with every iteration (what halting cost)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the result as JSON")
    args = ap.parse_args(argv)

    import torch

    from megaponder import load_model
    from megaponder.analysis import analyze_depth, format_depth_report
    from megaponder.train.checkpoint import read_checkpoint_config, resolve_checkpoint, tokenizer_file

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_checkpoint(args.checkpoint)
    seq = args.seq_length or read_checkpoint_config(folder).data.seq_length
    model = load_model(folder)
    kwargs = {} if args.jacobi_passes is None else {"jacobi_passes": args.jacobi_passes}
    res = analyze_depth(model, args.data, windows=args.windows, seq_length=seq,
                        batch_size=args.batch_size, compare_full_depth=args.compare_full_depth, **kwargs)
    res["checkpoint"] = folder
    tok_path = tokenizer_file(folder)
    if tok_path:
        from megaponder.data import build_tokenizer
        cfg = read_checkpoint_config(folder)
        tok = build_tokenizer(cfg.data.tokenizer_type, tok_path)
        for row in res["per_iteration"]:
            row["top_input_tokens_text"] = " ".join(f"{tok.decode([t])!r}:{c}" for t, c in row["top_input_tokens"])
    print(format_depth_report(res))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
