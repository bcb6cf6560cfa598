#!/usr/bin/env python
"""Prepare the bundled demo corpus (King James Bible, one document per chapter).

    python tools/prepare_demo_corpus.py --output-dir data/demo

Writes train/validation jsonl, a SentencePiece BPE tokenizer (8192 pieces), the
{train,validation}_text_document.{bin,idx} files and stats.json (incl. the unigram-baseline
validation perplexity). Steps whose outputs exist are reused, so a second call is instant.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaponder.data.demo import prepare_demo_corpus  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="data/demo")
    p.add_argument("--workers", type=int, default=1, help="preprocessing workers")
    p.add_argument("--force", action="store_true", help="rebuild everything")
    args = p.parse_args(argv)
    if args.force and os.path.isdir(args.output_dir):
        import shutil
        shutil.rmtree(args.output_dir)
    prepare_demo_corpus(args.output_dir, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
