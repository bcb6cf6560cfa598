"""On-disk cache of doc/sample/shuffle indices, named by a hash of what they hold.

A cache entry is four files in the cache directory:

    <hash>-<name>-doc_idx.npy, <hash>-<name>-sample_idx.npy, <hash>-<name>-shuffle_idx.npy,
    <hash>-<name>-description.json   (written last: its presence marks a complete entry)

``<hash>`` is the md5 of the description, which lists everything the indices depend on: the
algorithm and its version, the dataset's absolute prefix and an md5 of its ``sizes`` array, the
document range, seq_length, num_samples, seed. Changing any of them yields a new file name, so a
stale cache is never picked up, and the description says in plain JSON what each file is.
Files are written to a temporary name and renamed, so concurrent readers never see partial files.

The cache folder may be shared, so a cache file is data to check, not to trust: it is read with
``allow_pickle=False`` (a pickle never runs), and its dtype, shape and value ranges are checked
against the description (and the dataset's sizes) before use. A pickled, truncated, swapped or
out-of-range file is reported in one warning line and rebuilt; temp files are created
exclusively and renamed into place (megaponder/safe_files.py), so a planted link is never
written through.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Optional

import numpy as np

from ..safe_files import atomic_write

logger = logging.getLogger(__name__)

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


class DamagedCache(ValueError):
    """A cache file that is not what its name says (the message says why; ``part`` names the
    file: doc_idx, sample_idx, shuffle_idx or description)."""

    def __init__(self, message: str, part: str = "description"):
        super().__init__(message)
        self.part = part


def check_indices(description: dict, doc_idx: np.ndarray, sample_idx: np.ndarray,
                  shuffle_idx: np.ndarray, sizes: Optional[np.ndarray] = None) -> None:
    """Raise :class:`DamagedCache` unless the three arrays could have been built for
    ``description``: integer dtypes, the shapes the builders make, every doc_idx entry one of
    the described documents, every sample_idx row a doc_idx position (non-decreasing, offsets
    inside the document when ``sizes`` is given), shuffle_idx a list of sample rows."""
    for name, arr, ndim in (("doc_idx", doc_idx, 1), ("sample_idx", sample_idx, 2), ("shuffle_idx", shuffle_idx, 1)):
        if arr.dtype.kind not in "iu":
            raise DamagedCache(f"{name} has dtype {arr.dtype}, not integers", name)
        if arr.ndim != ndim or arr.shape[0] == 0 or (ndim == 2 and arr.shape[1] != 2):
            raise DamagedCache(f"{name} has shape {arr.shape}", name)
    first, end = description["documents"]
    if int(doc_idx.min()) < first or int(doc_idx.max()) >= end:
        raise DamagedCache(f"doc_idx names documents outside [{first}, {end})", "doc_idx")
    rows, offsets = sample_idx[:, 0], sample_idx[:, 1]
    if int(rows.min()) < 0 or int(rows.max()) >= len(doc_idx) or bool((np.diff(rows) < 0).any()):
        raise DamagedCache("sample_idx rows are not non-decreasing positions of doc_idx", "sample_idx")
    # megatron's padded last sample (drop_last=false) points at the last token of the last
    # document, offset -1 when that document is empty: its row is checked separately
    padded_last = not description.get("drop_last", True)
    inner = slice(0, len(rows) - 1) if padded_last else slice(None)
    if len(offsets[inner]) and int(offsets[inner].min()) < 0 or int(offsets[-1]) < -1:
        raise DamagedCache("sample_idx has negative offsets", "sample_idx")
    if sizes is not None:
        # every sample spans exactly seq_length + 1 tokens of the document stream (the padded
        # last one at most that), and each offset lies inside its document (the walk may
        # start at (0, 0) on an empty first document)
        doc_sizes = np.asarray(sizes, dtype=np.int64)[doc_idx]
        if bool((offsets[inner] >= np.maximum(doc_sizes[rows[inner]], 1)).any()):
            raise DamagedCache("sample_idx offsets fall outside their documents", "sample_idx")
        starts = np.concatenate(([0], np.cumsum(doc_sizes)[:-1]))
        spans = np.diff(starts[rows] + offsets)
        ok = spans == description["seq_length"]
        if padded_last and len(ok):
            ok[-1] = spans[-1] <= description["seq_length"]
        if not bool(ok.all()):
            raise DamagedCache(f"sample_idx rows do not span seq_length={description['seq_length']} "
                               f"tokens each", "sample_idx")
    samples = len(sample_idx) - 1
    if samples < description["num_samples"]:
        raise DamagedCache(f"sample_idx holds {samples} samples, fewer than the "
                           f"{description['num_samples']} asked", "sample_idx")
    if len(shuffle_idx) != samples or int(shuffle_idx.min()) < 0 or int(shuffle_idx.max()) >= samples:
        raise DamagedCache(f"shuffle_idx is not a permutation of the {samples} samples", "shuffle_idx")


def load(paths: dict, description: dict, sizes: Optional[np.ndarray] = None
         ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The cached arrays for ``description``, or None when the entry is absent, its description
    file differs or the arrays fail :func:`check_indices` (then one warning line says which file
    and why; the caller rebuilds the entry). The checks use the caller's description, never
    the one on disk."""
    if not all(os.path.isfile(paths[p]) for p in (*PARTS, "description")):
        return None
    part = "description"
    try:
        with open(paths["description"], encoding="utf-8") as f:
            if json.load(f) != description:
                raise DamagedCache("it describes other indices than its name says")
        arrays = []
        for part in PARTS:  # allow_pickle=False: a pickled "array" is refused, never unpickled
            arrays.append(np.load(paths[part], mmap_mode="r", allow_pickle=False))
        check_indices(description, *arrays, sizes=sizes)
    except (ValueError, OSError, EOFError, KeyError, TypeError, IndexError) as err:
        where = paths[getattr(err, "part", part)]
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        logger.warning(f"index cache {where} is damaged or not an index ({reason}); rebuilding it")
        return None
    return tuple(arrays)  # type: ignore[return-value]


def save(paths: dict, description: dict, arrays) -> None:
    os.makedirs(os.path.dirname(paths["description"]), exist_ok=True)
    for part, arr in zip(PARTS, arrays):
        with atomic_write(paths[part]) as f:  # a fresh temp name; never through a link
            np.save(f, arr, allow_pickle=False)
    with atomic_write(paths["description"], "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)


def load_or_build(cache_dir: Optional[str], description: dict, build: Callable, log=None,
                  sizes: Optional[np.ndarray] = None):
    """Return the cached indices for ``description`` or build (and, with a cache_dir, save) them.
    A damaged cache entry is rebuilt (``sizes``, the dataset's, lets the check cover offsets).

    An unwritable cache directory is not fatal: the indices are used from memory with a note."""
    if cache_dir is None:
        return build(), None
    paths = cache_paths(cache_dir, description)
    hit = load(paths, description, sizes)
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
