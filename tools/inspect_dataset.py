#!/usr/bin/env python
"""Decode what is in a dataset, or exactly what a training step saw.

    # one raw sequence of the indexed dataset
    python tools/inspect_dataset.py --data data/demo/train_text_document \
        --tokenizer-model data/demo/tokenizer.model --index 5

    # the micro-batches of optimizer step S on data-parallel rank R (same order as training)
    python tools/inspect_dataset.py --data data/demo/train_text_document \
        --tokenizer-model data/demo/tokenizer.model --step 3 --rank 1 \
        --micro-batch-size 8 --dp-size 2 --seq-length 128 --train-steps 100 [--seed 1234]

    # or take data/seed/batch settings from the run's config (e.g. runs/x/config.yml)
    python tools/inspect_dataset.py --config runs/x/config.yml --dp-size 2 --step 3 --rank 1

The sample order depends on the number of samples the run requested (train steps x global
batch), the seed, seq_length, split and index mode — pass the run's values (or --config).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tokenizer(args, data_cfg=None):
    from megaponder.data import build_tokenizer

    path = args.tokenizer_model or (data_cfg.tokenizer_model if data_cfg else None)
    if not path:
        return None
    # no type given: build_tokenizer infers it from the file
    kind = args.tokenizer_type or (data_cfg.tokenizer_type if data_cfg else None)
    return build_tokenizer(kind, path)


def _show(tok, tokens, as_tokens, max_chars):
    if as_tokens or tok is None:
        return " ".join(map(str, tokens))
    text = tok.decode(tokens)
    return text if max_chars <= 0 or len(text) <= max_chars else text[:max_chars] + " …"


def main(argv=None) -> int:
    from megaponder.config import DataConfig, load_config
    from megaponder.data import IndexedDataset, build_train_valid_datasets, step_micro_batches
    from megaponder.data.schedule import global_batch_size, grad_accum_for, run_num_samples

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", help="dataset prefix (or Megatron-style weighted list)")
    p.add_argument("--config", help="a run config.yml: data, seed and batch settings come from it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for --config")
    p.add_argument("--tokenizer-model")
    p.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HFTokenizer"])
    p.add_argument("--index", type=int, help="decode raw sequence i of --data")
    p.add_argument("--step", type=int, help="optimizer step (0-based) to show")
    p.add_argument("--rank", type=int, default=0, help="data-parallel rank")
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=100, help="train.steps of the run")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--index-mode", choices=["pythia", "megatron"], default="pythia")
    p.add_argument("--index-cache-dir")
    p.add_argument("--tokens", action="store_true", help="print token ids instead of text")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.add_argument("--max-chars", type=int, default=400, help="truncate decoded text (0: never)")
    args = p.parse_args(argv)

    if args.index is not None:
        if not args.data:
            p.error("--index needs --data PREFIX")
        ds = IndexedDataset(args.data[0])
        tok = _tokenizer(args)
        tokens = ds[args.index].tolist()
        if args.json:
            print(json.dumps({"index": args.index, "tokens": tokens,
                              "text": tok.decode(tokens) if tok else None}))
        else:
            print(f"sequence {args.index} of {ds} ({len(tokens)} tokens):")
            print(_show(tok, tokens, args.tokens, 0))
        return 0
    if args.step is None:
        p.error("give --index i, or --step S (with --rank/--dp-size/...)")

    if args.config:
        cfg = load_config(args.config, args.set, check_paths=False)
        data_cfg, seed = cfg.data, cfg.train.seed
        mbs, accum = cfg.train.micro_batch_size, grad_accum_for(cfg.train, args.dp_size)
        n_train, _ = run_num_samples(cfg, args.dp_size)
    else:
        if not args.data:
            p.error("--step needs --data or --config")
        data_cfg = DataConfig(path=args.data, split=args.split, seq_length=args.seq_length,
                              index_mode=args.index_mode, index_cache_dir=args.index_cache_dir,
                              tokenizer_model=args.tokenizer_model)
        seed, mbs, accum = args.seed, args.micro_batch_size, args.grad_accum_steps
        n_train = args.train_steps * global_batch_size(mbs, args.dp_size, accum)
    gbs = global_batch_size(mbs, args.dp_size, accum)
    train, _ = build_train_valid_datasets(data_cfg, seed, n_train, 0)
    tok = _tokenizer(args, data_cfg)
    batches = step_micro_batches(args.step, gbs, mbs, args.rank, args.dp_size, len(train))
    if not args.json:
        print(f"step {args.step}, rank {args.rank}/{args.dp_size}: {len(batches)} micro-batch(es) "
              f"of {mbs}; global batch {gbs}; {n_train} train samples requested, seed {seed}, "
              f"{data_cfg.index_mode} order")
    for m, idx in enumerate(batches):
        for slot, i in enumerate(idx.tolist()):
            tokens = train[i]["tokens"].tolist()
            if args.json:
                print(json.dumps({"step": args.step, "rank": args.rank, "micro_batch": m,
                                  "slot": slot, "sample": i, "tokens": tokens,
                                  "text": tok.decode(tokens) if tok else None}))
            else:
                print(f"--- micro-batch {m} slot {slot}: sample {i} ({len(tokens)} tokens)")
                print(_show(tok, tokens, args.tokens, args.max_chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
