#!/usr/bin/env python
"""Preprocessing throughput vs the tokenizer's own batch-encode throughput (same worker count).

    python benchmarks/bench_preprocess.py [--demo-dir data/demo] [--workers 1 2]

"tokenizer only" = encode_batch of every document's text in the same number of processes (a
fork Pool over equal chunks), no JSON parsing or writing: the ceiling for preprocess_data.py.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaponder.data.demo import prepare_demo_corpus  # noqa: E402
from megaponder.data.preprocess import preprocess  # noqa: E402
from megaponder.data.tokenizer import build_tokenizer  # noqa: E402

_TOK = None


def _encode_chunk(args):
    kind, model, texts = args
    global _TOK
    if _TOK is None:
        _TOK = build_tokenizer(kind, model)
    return sum(len(x) for x in _TOK.encode_batch(texts))


def tokenizer_only(kind, model, texts, workers):
    t0 = time.perf_counter()
    if workers == 1:
        n = _encode_chunk((kind, model, texts))
    else:
        step = (len(texts) + workers - 1) // workers
        chunks = [(kind, model, texts[i:i + step]) for i in range(0, len(texts), step)]
        with mp.get_context("fork").Pool(workers) as pool:
            n = sum(pool.map(_encode_chunk, chunks))
    return time.perf_counter() - t0, n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--demo-dir", default="data/demo")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="best of N")
    args = p.parse_args()
    prepare_demo_corpus(args.demo_dir, log=lambda *a: None)
    src = os.path.join(args.demo_dir, "train.jsonl")
    model = os.path.join(args.demo_dir, "tokenizer.model")
    texts = [json.loads(l)["text"] for l in open(src, encoding="utf-8")]
    mb = os.path.getsize(src) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            pre = min(_time(lambda: preprocess(src, ["text"], "SentencePieceTokenizer", model,
                                               os.path.join(tmp, "b"), append_eod=True, workers=w,
                                               progress=False, out=open(os.devnull, "w")))
                      for _ in range(args.repeat))
            tok = min(tokenizer_only("SentencePieceTokenizer", model, texts, w)[0]
                      for _ in range(args.repeat))
            n_tokens = tokenizer_only("SentencePieceTokenizer", model, texts, 1)[1] + len(texts)
            rows.append((w, n_tokens / pre, n_tokens / tok, tok / pre))
    print(f"demo corpus train split: {len(texts)} docs, {mb:.1f} MB, SentencePiece BPE 8192, "
          f"{os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"| workers | preprocess_data (tokens/s) | tokenizer encode_batch only (tokens/s) | ratio |")
    print(f"|---:|---:|---:|---:|")
    for w, a, b, r in rows:
        print(f"| {w} | {a:,.0f} | {b:,.0f} | {r:.2f} |")


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
