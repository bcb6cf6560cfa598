#!/usr/bin/env python
"""Tokenize a JSON-lines corpus into Megatron/GPT-NeoX MMIDIDX files.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --output-prefix data/corpus --append-eod --workers 4
    # -> data/corpus_text_document.bin / .idx

Bad records (invalid JSON, missing key, undecodable bytes, empty text) are skipped, counted, and
listed with their line numbers; see docs/data.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaponder.data.preprocess import preprocess  # noqa: E402
from megaponder.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="JSON-lines file (.jsonl, .jsonl.gz, .jsonl.zst)")
    p.add_argument("--json-keys", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"],
                   help="keys to tokenize; one output per key (GPT-NeoX spelling accepted)")
    p.add_argument("--tokenizer-type", required=True,
                   choices=list(TOKENIZER_TYPES) + ["SPMTokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--tokenizer-model", required=True, help=".model (SentencePiece) or .json (HF)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, each writing a shard that is merged at the end "
                        "(default: CPU count); the output does not depend on it")
    p.add_argument("--dataset-impl", default="mmap",
                   help="accepted for Megatron/NeoX compatibility; only 'mmap' exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.dataset_impl != "mmap":
        p.error(f"--dataset-impl {args.dataset_impl}: only 'mmap' (MMIDIDX) is supported; the "
                f"legacy cached/lazy formats are not written.")
    try:
        summary = preprocess(args.input, args.json_keys, args.tokenizer_type, args.tokenizer_model,
                             args.output_prefix, append_eod=args.append_eod, workers=args.workers,
                             progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if sum(summary["documents"].values()) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
