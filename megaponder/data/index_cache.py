"""On-disk cache of doc/sample/shuffle indices, named by a hash of what they hold.

A cache entry is four files in the cache directory:

    <hash>-<name>-doc_idx.npy, <hash>-<name>-sample_idx.npy, <hash>-<name>-shuffle_idx.npy,
    <hash>-<name>-description.json   (written last: its presence marks a complete entry)

``<hash>`` is the md5 of the description, which lists everything the indices depend on: the
algorithm and its version, the dataset's absolute prefix and an md5 of its ``sizes`` array, the
document range, seq_length, num_samples, seed. Changing any of them yields a new file name, so a
stale cache is never picked up, and the description says in plain JSON what each file is.
Files are written to a temporary name and renamed, so concurrent readers never see partial files.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import numpy as np

FORMAT_VERSION = 1
PARTS = ("doc_idx", "sample_idx", "shuffle_idx")


def sizes_fingerprint(sizes: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(sizes, dtype="<i4").tobytes()).hexdigest()


def describe(mode: str, prefix: str, sizes: np.ndarray, doc_range: tuple[int, int], name: str,
             seq_length: int, num_samples: int, seed: int, drop_last: bool = True) -> dict:
    return {
        "format": f"megaponder-gpt-indices/{FORMAT_VERSION}",
        "mode": mode,
        "dataset": os.path.abspath(prefix),
        "sizes_md5": sizes_fingerprint(sizes),
        "documents": [int(doc_range[0]), int(doc_range[1])],
        "name": name,
        "seq_length": int(seq_length),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "drop_last": bool(drop_last),
    }


def cache_paths(cache_dir: str, description: dict) -> dict:
    digest = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
    base = os.path.join(cache_dir, f"{digest}-{description['name']}")
    paths = {part: f"{base}-{part}.npy" for part in PARTS}
    paths["description"] = f"{base}-description.json"
    return paths


def load(paths: dict) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if not all(os.path.isfile(paths[p]) for p in (*PARTS, "description")):
        return None
    return tuple(np.load(paths[p], mmap_mode="r") for p in PARTS)  # type: ignore[return-value]


def save(paths: dict, description: dict, arrays) -> None:
    os.makedirs(os.path.dirname(paths["description"]), exist_ok=True)
    pid = os.getpid()
    for part, arr in zip(PARTS, arrays):
        tmp = f"{paths[part]}.{pid}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, paths[part])
    tmp = f"{paths['description']}.{pid}.tmp"
    with open(tmp, "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)
    os.replace(tmp, paths["description"])


def load_or_build(cache_dir: Optional[str], description: dict, build: Callable, log=None):
    """Return the cached indices for ``description`` or build (and, with a cache_dir, save) them.

    An unwritable cache directory is not fatal: the indices are used from memory with a note."""
    if cache_dir is None:
        return build(), None
    paths = cache_paths(cache_dir, description)
    hit = load(paths)
    if hit is not None:
        if log:
            log(f"index cache hit: {paths['description']}")
        return hit, paths
    if log:
        log(f"index cache miss, building: {paths['description']}")
    arrays = build()
    try:
        save(paths, description, arrays)
    except OSError as e:
        if log:
            log(f"could not write the index cache to {cache_dir} ({e}); using in-memory indices")
        return arrays, None
    return arrays, paths
