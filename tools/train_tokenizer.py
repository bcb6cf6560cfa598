#!/usr/bin/env python
"""Train a SentencePiece or Hugging Face byte-level BPE tokenizer on JSON-lines text.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \
        --kind sentencepiece --vocab-size 32000 --output data/tok/spm32k.model
    python tools/train_tokenizer.py --input corpus.jsonl.zst --kind hf-bpe \
        --vocab-size 50304 --output data/tok/bpe.json

Both put the end-of-document symbol <|endoftext|> in the vocabulary (what --append-eod of
preprocess_data.py appends). Byte fallback, newline handling and where the GPT-NeoX-20B tokenizer
comes from offline: docs/data.md. Bad records are skipped and counted, as in preprocess_data.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaponder.data.tokenizer_training import KINDS, train_tokenizer  # noqa: E402
from megaponder.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, nargs="+", help="JSON-lines file(s) (.jsonl, .gz, .zst)")
    p.add_argument("--json-keys", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"])
    p.add_argument("--kind", choices=KINDS, required=True,
                   help="sentencepiece (.model) or hf-bpe (byte-level BPE, tokenizers .json)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="the .model or .json to write")
    p.add_argument("--max-documents", type=int, default=None, help="read at most this many records")
    p.add_argument("--seed", type=int, default=1234, help="sentencepiece: sampling seed")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece only")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="sentencepiece only: unseen characters become <unk> instead of bytes")
    p.add_argument("--newlines", choices=("keep", "space"), default="keep",
                   help="sentencepiece only: keep '\\n' as a symbol (default), or let the "
                        "normaliser turn it into a space as plain SentencePiece does")
    p.add_argument("--min-frequency", type=int, default=2, help="hf-bpe only: rarest merge kept")
    args = p.parse_args(argv)
    if args.kind == "sentencepiece":
        options = dict(model_type=args.model_type, byte_fallback=not args.no_byte_fallback,
                       newlines=args.newlines, seed=args.seed)
    else:
        options = dict(min_frequency=args.min_frequency)
    try:
        summary = train_tokenizer(args.input, args.json_keys, args.kind, args.output,
                                  args.vocab_size, max_documents=args.max_documents, **options)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
