#!/usr/bin/env python
"""Concatenate several MMIDIDX datasets into one (document boundaries preserved).

    python tools/merge_datasets.py --inputs a_text_document b_text_document --output-prefix ab
    python tools/merge_datasets.py --input-dir shards/ --output-prefix all   # every *.idx, sorted

Unlike GPT-NeoX's merge (which leaves doc_idx == [0]), the merged doc_idx lists every document.
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaponder.data.checks import write_merged_meta  # noqa: E402
from megaponder.data.indexed import (DatasetFormatError, IndexedDataset,  # noqa: E402
                                     IndexedDatasetBuilder, get_bin_path, get_idx_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--inputs", nargs="+", help="dataset prefixes, merged in this order")
    g.add_argument("--input-dir", help="merge every PREFIX.idx/.bin pair in this directory")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    prefixes = args.inputs or sorted(f[:-4] for f in glob.glob(os.path.join(args.input_dir, "*.idx")))
    if not prefixes:
        p.error(f"no .idx files in {args.input_dir}")
    out = os.path.abspath(args.output_prefix)
    if out in {os.path.abspath(x) for x in prefixes}:
        p.error("--output-prefix must differ from every input")
    # written under a temporary prefix and renamed at the end: a failed merge keeps old outputs
    tmp = args.output_prefix + ".merge-tmp"
    try:
        first = IndexedDataset(prefixes[0])
        builder = IndexedDatasetBuilder(get_bin_path(tmp), first.dtype)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(get_idx_path(tmp))
        for path in (get_bin_path, get_idx_path):
            os.replace(path(tmp), path(args.output_prefix))
    except (DatasetFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for path in (get_bin_path, get_idx_path):
            if os.path.exists(path(tmp)):
                os.remove(path(tmp))
    # the tokenizer sidecar carries over when all inputs share one (megaponder/data/checks.py)
    write_merged_meta(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets -> {args.output_prefix}.bin/.idx: "
          f"{merged.num_documents} documents, {len(merged)} sequences, {merged.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
