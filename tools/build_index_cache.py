#!/usr/bin/env python
"""Build the doc/sample/shuffle index caches of a run offline (no GPUs idling on rank 0).

    python tools/build_index_cache.py --config examples/configs/tiny.yml [--set k=v]... [--dp-size D]
                                      [--progress | --no-progress]

Uses exactly the trainer's sample counts (megaponder.data.schedule.run_num_samples), writes the
caches to data.index_cache_dir (or PREFIX's directory/index-cache) and prints each cache file.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megaponder.config import load_config
    from megaponder.data import build_train_valid_datasets
    from megaponder.data.schedule import run_num_samples

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks of the run")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr, one step per index built or loaded "
                        "(default: when stderr is a terminal)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    n_train, n_valid = run_num_samples(cfg, args.dp_size)
    t0 = time.time()
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    train, valid = build_train_valid_datasets(cfg.data, cfg.train.seed, n_train, n_valid,
                                              progress=progress)
    for name, ds in (("train", train), ("valid", valid)):
        parts = getattr(ds, "datasets", [ds]) if ds is not None else []
        for part in parts:
            where = part.cache_paths["description"] if part.cache_paths else "(not cached)"
            print(f"{name}: {len(part)} samples ({part.mode} order) -> {where}")
    print(f"index caches ready for {n_train} train / {n_valid} valid samples in "
          f"{time.time() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
