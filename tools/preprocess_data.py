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
from megaponder.errors import run_reporting_user_errors  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="JSON-lines file (.jsonl, .jsonl.gz, .jsonl.zst)")
    p.add_argument("--json-keys", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"],
                   help="keys to tokenize; one output per key (GPT-NeoX spelling accepted)")
    p.add_argument("--tokenizer-type", default=None,
                   choices=list(TOKENIZER_TYPES) + ["SPMTokenizer", "HuggingFaceTokenizer",
                                                    "GPT2BPETokenizer"],
                   help="default: what --tokenizer-model holds")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model, tokenizer.json, GPT-2 vocab.json (merges.txt next "
                        "to it) or a folder holding one of those")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token for --append-eod (default: the first of "
                        "<|endoftext|>, <|end_of_text|>, </s>, <eos>, ... the tokenizer has)")
    p.add_argument("--max-record-bytes", type=int, default=None,
                   help="skip (and count) records longer than this; default: sized for this "
                        "machine's memory and --workers, between 1 MiB and 256 MiB")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, each writing a shard that is merged at the end "
                        "(default: CPU count); the output does not depend on it")
    p.add_argument("--dataset-impl", default="mmap",
                   help="accepted for Megatron/NeoX compatibility; only 'mmap' exists")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on when stderr is a terminal)")
    args = p.parse_args(argv)
    if args.dataset_impl != "mmap":
        p.error(f"--dataset-impl {args.dataset_impl}: only 'mmap' (MMIDIDX) is supported; the "
                f"legacy cached/lazy formats are not written.")
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    def run() -> int:
        summary = preprocess(args.input, args.json_keys, args.tokenizer_type, args.tokenizer_model,
                             args.output_prefix, append_eod=args.append_eod, workers=args.workers,
                             progress=progress, eod_token=args.eod_token,
                             max_record_bytes=args.max_record_bytes)
        return 0 if sum(summary["documents"].values()) > 0 else 1

    # a UserError (missing input, unreadable tokenizer, busy prefix): one line, exit 2
    return run_reporting_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
