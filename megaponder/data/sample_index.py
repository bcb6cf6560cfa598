"""doc / sample / shuffle index construction for GPT-style packed samples, in numpy.

Two algorithms that produce *different* orders for the same seed (docs/data.md §indices):

* ``pythia``   — GPT-NeoX ``GPT2Dataset`` with ``pack_impl="packed"`` (how Pythia was trained):
  epochs E = min{E : floor((E·T − 1)/S) >= n}; all E epochs of document ids are tiled and
  shuffled together once; the shuffle index uses the same RandomState afterwards.
* ``megatron`` — megatron-core ``GPTDataset``: E = min{E : E·T >= n·S + 1}; when E > 1 and the
  last epoch contributes < 80% of an epoch, that epoch is shuffled separately (documents and
  samples), which changes the RNG call sequence.

Both share the sample index: sample j covers flattened token positions [j·S, j·S + S] of the
shuffled document stream (S+1 tokens; consecutive samples share one token). Row j of
``sample_idx`` is (position in doc_idx, offset in that document) of position j·S, i.e. j·S located
in the cumulative document lengths (the rows megatron-core's ``helpers_cpp`` greedy walk gives;
tested equal). A small C extension (``_sample_index.c``, built by ``pip install -e .`` where a C
compiler is present) writes them in one pass over the documents; without it the same rows come
from numpy (each document's row count and ``np.repeat``, about six passes over the arrays).
"""
from __future__ import annotations

import contextlib
import importlib
import math
from typing import Optional

import numpy as np

try:  # the C extension (a leaf, imports nothing); by name, since `from . import` would read as
    # an import of the megaponder.data package, which imports this module
    _compiled = importlib.import_module(f"{__package__}._sample_index")
except ImportError:  # installed without a C compiler: the numpy path gives the same rows
    _compiled = None

INT32_MAX = np.iinfo(np.int32).max


# ---- splits ---------------------------------------------------------------------------------
def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '969/30/1') → normalized [train, valid, test] weights."""
    sep = "," if "," in split else "/" if "/" in split else None
    try:
        parts = [float(s) for s in (split.split(sep) if sep else [split])]
    except ValueError:
        raise ValueError(f"data.split '{split}' must be numbers separated by commas, e.g. '969,30,1'.")
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split '{split}' needs non-negative parts with a positive sum.")
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges_pythia(split: str, size: int) -> list[tuple[int, int]]:
    """GPT-NeoX ``get_train_valid_test_split_``: rounded cumulative sizes, then the rounding excess
    is taken off every boundary so the last one lands exactly on ``size``."""
    weights = parse_split(split)
    index = [0]
    for w in weights:
        index.append(index[-1] + int(round(w * float(size))))
    diff = index[-1] - size
    for i in range(1, len(index)):
        index[i] -= diff
    return [(index[i], index[i + 1]) for i in range(3)]


def split_ranges_megatron(split: str, size: int) -> list[tuple[int, int]]:
    """megatron-core: bookends of the cumulative normalized split, each rounded on its own."""
    weights = parse_split(split)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    return [(int(round(bounds[i] * float(size))), int(round(bounds[i + 1] * float(size))))
            for i in range(3)]


# ---- epochs ---------------------------------------------------------------------------------
def num_epochs_pythia(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # closed form of NeoX's loop: smallest E >= 1 with (E*T - 1) // S >= n
    e = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
    while e > 1 and (((e - 1) * tokens_per_epoch - 1) // seq_length) >= num_samples:
        e -= 1
    while ((e * tokens_per_epoch - 1) // seq_length) < num_samples:
        e += 1
    return e


def num_epochs_megatron(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # smallest E >= 1 with E*T >= n*S + 1
    return max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))


# ---- the three indices ----------------------------------------------------------------------
def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """``documents`` tiled ``num_epochs`` times as int32 and shuffled in place by ``rng``
    (exactly NeoX's/Megatron's ``np.mgrid`` construction, so the RNG draws are identical)."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int,
                     dtype=np.int32, drop_last: bool = True, add_extra_token: int = 1) -> np.ndarray:
    """[num_samples + 1, 2] rows of (doc_idx position, token offset); see the module docstring.

    ``num_samples`` is the count the C++ helper derives from epochs and tokens;
    ``drop_last=False`` reproduces megatron's padded final partial sample. Uses the compiled
    extension when it is built, numpy otherwise (``numpy_sample_index()`` forces numpy)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.int32, np.int64):
        raise TypeError(f"sample_idx dtype must be int32 or int64 (got {dtype}).")
    m = len(doc_idx)
    if dtype == np.int32 and m > INT32_MAX:
        raise OverflowError(f"doc_idx has {m} entries, more than an int32 sample_idx holds; "
                            f"pass dtype=np.int64.")
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    sizes, doc_idx = np.asarray(sizes), np.asarray(doc_idx)
    if _compiled is not None:
        # int32/int64 buffers go straight through; anything else (a uint16 array) is widened
        total = _compiled.fill_sample_idx(_as_index_array(sizes), _as_index_array(doc_idx),
                                          seq_length, out)
    else:
        total = _fill_sample_idx_numpy(sizes, doc_idx, seq_length, out)
    out[0] = (0, 0)  # the C++ walk always starts at (0, 0), even on an empty first document
    if not drop_last and num_samples * seq_length > total - add_extra_token:
        # megatron's "end of documents" branch: the final row points at the last usable token
        out[-1] = (m - 1, int(sizes[doc_idx[-1]]) - add_extra_token)
    return out


def _as_index_array(a: np.ndarray) -> np.ndarray:
    if a.dtype in (np.int32, np.int64) and a.dtype.isnative:
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(a, dtype=np.int64)


def _fill_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                           out: np.ndarray) -> int:
    """The extension's rows in numpy (row j = (i, j*S - starts[i]) for the last stream entry i
    starting at or before j*S) → the stream's token count."""
    m, num_samples = len(doc_idx), len(out) - 1
    if m and (doc_idx.min() < 0 or doc_idx.max() >= len(sizes)):
        bad = int(np.flatnonzero((doc_idx < 0) | (doc_idx >= len(sizes)))[0])
        raise IndexError(f"doc_idx[{bad}] = {int(doc_idx[bad])} is not a document of sizes "
                         f"(valid: 0..{len(sizes) - 1})")
    starts = np.zeros(m + 1, dtype=np.int64)  # starts[i]: first stream position of doc_idx[i]
    np.cumsum(sizes[doc_idx], dtype=np.int64, out=starts[1:])
    # Both the row positions and the starts are sorted, so instead of n binary searches over m
    # starts (cache-hostile at millions of rows) count linearly: document i owns the rows j with
    # ceil(starts[i]/S) <= j < ceil(starts[i+1]/S) (none for an empty document); the trailing
    # entry (start = total) owns rows past the end, which only megatron's drop_last=False reaches.
    first_row = np.empty(m + 2, dtype=np.int64)
    np.floor_divide(starts + (seq_length - 1), seq_length, out=first_row[:-1])
    first_row[-1] = num_samples + 1
    np.minimum(first_row, num_samples + 1, out=first_row)
    which = np.repeat(np.arange(m + 1, dtype=np.int32 if m < INT32_MAX else np.int64),
                      np.diff(first_row))
    offsets = np.arange(num_samples + 1, dtype=np.int64)
    offsets *= seq_length
    offsets -= starts[which]
    out[:, 0] = which
    out[:, 1] = offsets
    return int(starts[-1])


@contextlib.contextmanager
def numpy_sample_index():
    """Within the block ``build_sample_idx`` takes the numpy path even where the extension is
    built (parity tests and benchmarks compare the two)."""
    global _compiled
    saved, _compiled = _compiled, None
    try:
        yield
    finally:
        _compiled = saved


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """arange(num_samples) shuffled, then (megatron's separate final epoch) arange(num_samples,
    total_size) shuffled after it. uint32 unless the size needs int64, as upstream."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_pythia_indices(sizes: np.ndarray, documents: np.ndarray, seq_length: int,
                         num_samples: int, seed: int):
    """GPT-NeoX/Pythia order → (doc_idx, sample_idx, shuffle_idx)."""
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    _check_tokens(tokens_per_epoch, seq_length)
    epochs = num_epochs_pythia(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, epochs, rng)
    n = (epochs * tokens_per_epoch - 1) // seq_length
    dtype = np.int32 if 2 * (n + 1) < INT32_MAX else np.int64
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, n, dtype)
    shuffle_idx = build_shuffle_idx(n, n, rng)
    return doc_idx, sample_idx, shuffle_idx


def build_megatron_indices(sizes: np.ndarray, documents: np.ndarray, seq_length: int,
                           num_samples: int, seed: int, drop_last: bool = True):
    """megatron-core ``GPTDataset`` order → (doc_idx, sample_idx, shuffle_idx)."""
    sizes = np.asarray(sizes)
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    _check_tokens(tokens_per_epoch, seq_length)
    epochs = num_epochs_megatron(tokens_per_epoch, seq_length, num_samples)
    separate_final_epoch = False
    if epochs > 1:
        without_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - without_final
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = from_final < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate_final_epoch:
        doc_idx = np.concatenate((build_doc_idx(documents, epochs - 1, rng),
                                  build_doc_idx(documents, 1, rng)))
    else:
        doc_idx = build_doc_idx(documents, epochs, rng)
    if drop_last:
        n = (epochs * tokens_per_epoch - 1) // seq_length
    else:
        n = math.ceil(float(epochs * tokens_per_epoch - 1) / seq_length)
    big = max(len(doc_idx), int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if big <= INT32_MAX else np.int64
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, n, dtype, drop_last=drop_last)
    if separate_final_epoch:
        shuffle_idx = build_shuffle_idx(without_final, n, rng)
    else:
        shuffle_idx = build_shuffle_idx(n, n, rng)
    return doc_idx, sample_idx, shuffle_idx


def _check_tokens(tokens_per_epoch: int, seq_length: int) -> None:
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2 (got {seq_length}).")
    if tokens_per_epoch <= 1:
        raise ValueError(f"the selected documents hold {tokens_per_epoch} token(s); at least 2 are "
                         f"needed to build a sample. Check data.split and the dataset.")


def read_sample(dataset, doc_idx: np.ndarray, sample_idx: np.ndarray, j: int,
                length: int, pad: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of sample j (int64, ``length`` = S+1 long) and the sequence id behind each token.

    Reads from the start row to the end row *inclusive* of the end offset; pads with ``pad``
    only for megatron's non-dropped partial last sample."""
    (p0, off0), (p1, off1) = sample_idx[j], sample_idx[j + 1]
    p0, off0, p1, off1 = int(p0), int(off0), int(p1), int(off1)
    parts, seq_ids = [], []
    for p in range(p0, p1 + 1):
        seq = int(doc_idx[p])
        start = off0 if p == p0 else 0
        stop = off1 + 1 if p == p1 else int(dataset.sizes[seq])
        piece = dataset.get(seq, start, stop - start)
        parts.append(piece)
        seq_ids.append(np.full(len(piece), seq, dtype=np.int64))
    tokens = np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)
    ids = np.concatenate(seq_ids) if len(seq_ids) > 1 else seq_ids[0]
    if len(tokens) < length:
        if pad is None:
            raise ValueError(f"sample {j} has {len(tokens)} tokens, expected {length}")
        tokens = np.concatenate([tokens, np.full(length - len(tokens), pad, dtype=np.int64)])
        ids = np.concatenate([ids, np.full(length - len(ids), -1, dtype=np.int64)])
    return tokens, ids
