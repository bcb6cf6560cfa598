"""The Megatron / GPT-NeoX "MMIDIDX" indexed dataset: a ``.bin`` of raw tokens plus an ``.idx``.

Layout of ``PREFIX.idx`` (all little-endian; see docs/data.md):

    0   9 bytes  magic  b"MMIDIDX\\x00\\x00"
    9   uint64   version (1)
    17  uint8    dtype code (DTYPE_CODES)
    18  uint64   N  number of sequences
    26  uint64   D  number of document-index entries (documents + 1)
    34  int32[N] sizes     tokens per sequence
        int64[N] pointers  byte offset of each sequence in PREFIX.bin
        int64[D] doc_idx   document k = sequences [doc_idx[k], doc_idx[k+1])

``PREFIX.bin`` is the headerless concatenation of the sequences in that dtype.

The reader validates every header field and the sizes of both files up front so that a truncated
or corrupt file raises :class:`DatasetFormatError` naming the file, the field, what was expected
and what was found, instead of a numpy error deep inside training.
"""
from __future__ import annotations

import os
import shutil
import struct
import warnings
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import DataError, MissingFileError
from ..safe_files import atomic_write, open_for_write

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"  # GPT-NeoX/old Megatron "cached"/"lazy" format
VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # = 34

# megatron-core's table. Codes 6/7 are swapped in GPT-NeoX (6=float32, 7=float64); token files
# never use them, so the reader follows megatron-core unless told ``float_codes="neox"``.
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
NEOX_FLOAT_CODES = {6: np.float32, 7: np.float64}


class DatasetFormatError(DataError):
    """A ``.bin``/``.idx`` pair (or an input file) is not what the format requires."""

    def __init__(self, path: str, field: str, expected, found, hint: str = ""):
        self.path, self.field, self.expected, self.found = path, field, expected, found
        msg = f"{path}: bad {field}: expected {expected}, found {found}."
        if hint:
            msg += " " + hint
        super().__init__(msg)


class DatasetNotFoundError(MissingFileError):
    """``PREFIX.bin`` or ``PREFIX.idx`` does not exist."""


#: pointers are checked against the sizes in slices of this many sequences (bounded memory)
_POINTER_CHECK_CHUNK = 1 << 22


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == dtype:
            return code
    raise ValueError(f"dtype {dtype} has no MMIDIDX code; use one of "
                     f"{sorted(np.dtype(d).name for d in DTYPE_CODES.values())}")


def best_token_dtype(vocab_size: Optional[int]):
    """uint16 when every id fits comfortably (vocab < 65500), else int32 — the rule both
    Megatron's and GPT-NeoX's preprocessors use, so files stay byte-identical to theirs."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def write_index(idx_path: str, dtype, sizes: Sequence[int], doc_idx: Sequence[int]) -> None:
    """Write an ``.idx`` for sequences of ``sizes`` tokens with document boundaries ``doc_idx``."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        # exclusive prefix sum in bytes; int64 so that >2 GiB files do not wrap
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with atomic_write(idx_path) as f:  # readers never see a half-written index; never via a link
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(doc_idx.astype("<i8").tobytes(order="C"))


class IndexedDatasetBuilder:
    """Streaming writer. Same call sequence as megatron-core's builder:

        b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        b.add_item(tokens); b.end_document()      # or b.add_document(tokens, [len(tokens)])
        b.add_index(other_prefix)                 # merge a whole dataset (doc_idx shifted)
        b.finalize(prefix + ".idx")
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject unsupported dtypes now, not at finalize
        self._bin = open_for_write(bin_path, "wb")  # a planted link at the name is refused
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]

    def add_item(self, tokens) -> None:
        arr = _as_array(tokens, self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.sizes.append(int(arr.size))

    def end_document(self) -> None:
        self.doc_idx.append(len(self.sizes))

    def add_document(self, tokens, lengths: Iterable[int]) -> None:
        arr = _as_array(tokens, self.dtype)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"add_document: lengths sum to {sum(lengths)} but {arr.size} tokens given")
        self._bin.write(arr.tobytes(order="C"))
        self.sizes.extend(lengths)
        self.doc_idx.append(len(self.sizes))

    def add_index(self, prefix: str) -> None:
        """Append every sequence and document of dataset ``prefix``.

        Unlike GPT-NeoX's ``merge_file_`` (which leaves ``doc_idx == [0]``), the other dataset's
        document boundaries are shifted and appended, as megatron-core's ``add_index`` does."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DatasetFormatError(get_idx_path(prefix), "dtype", self.dtype.name, other.dtype.name,
                                     "All merged datasets must share one token dtype.")
        offset = len(self.sizes)
        self.sizes.extend(other.sizes.tolist())
        self.doc_idx.extend((np.asarray(other.doc_idx[1:], dtype=np.int64) + offset).tolist())
        del other
        with open(get_bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=16 << 20)

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        write_index(idx_path, self.dtype, self.sizes, self.doc_idx)


def _as_array(tokens, dtype) -> np.ndarray:
    if hasattr(tokens, "detach"):  # torch tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.size and arr.dtype.kind in "iu" and np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"token id {hi if hi > info.max else lo} does not fit the dataset "
                             f"dtype {np.dtype(dtype).name}; use a wider dtype (int32).")
    return np.ascontiguousarray(arr.reshape(-1), dtype=dtype)


class IndexedDataset:
    """Memory-mapped reader of a ``PREFIX.bin``/``PREFIX.idx`` pair.

    ``len(ds)`` sequences; ``ds[i]`` the tokens of sequence i (a read-only numpy view);
    ``ds.get(i, offset, length)`` a slice of it; ``ds.sizes`` (int32), ``ds.pointers`` (int64),
    ``ds.doc_idx`` (int64, documents + 1 entries). Aliases ``sequence_lengths`` and
    ``document_indices`` match megatron-core's names.
    """

    def __init__(self, prefix: str, float_codes: str = "megatron"):
        self.prefix = prefix
        self.idx_path, self.bin_path = get_idx_path(prefix), get_bin_path(prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DatasetNotFoundError(f"{path} does not exist (dataset prefix '{prefix}'). "
                                           f"Build it with tools/preprocess_data.py.")
        self._read_index(float_codes)
        self._check_bin()
        # plain ndarray views over the mapping (np.memmap subclasses leak into user code)
        self._bin = (np.frombuffer(np.memmap(self.bin_path, dtype=np.uint8, mode="r"), np.uint8)
                     if os.path.getsize(self.bin_path) else np.zeros(0, np.uint8))

    # ---- index parsing with explicit checks -------------------------------------------------
    def _read_index(self, float_codes: str) -> None:
        path = self.idx_path
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[:8] == LEGACY_MAGIC:
            raise DatasetFormatError(path, "magic", MAGIC, header[:8],
                                     "This is GPT-NeoX's legacy 'cached/lazy' (TNTIDX) format; "
                                     "re-run preprocessing with --dataset-impl mmap.")
        if len(header) < 9 or header[:9] != MAGIC:
            raise DatasetFormatError(path, "magic", MAGIC, header[:9],
                                     "Not an MMIDIDX index file.")
        if len(header) < HEADER_BYTES:
            raise DatasetFormatError(path, "header length", f"{HEADER_BYTES} bytes",
                                     f"{len(header)} bytes", "The file is truncated.")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DatasetFormatError(path, "version", VERSION, version)
        code = header[17]
        table = dict(DTYPE_CODES)
        if float_codes == "neox":
            table.update(NEOX_FLOAT_CODES)
        if code not in table:
            raise DatasetFormatError(path, "dtype code", f"one of {sorted(table)}", code)
        self.dtype = np.dtype(table[code])
        self.dtype_code = code
        n, d = struct.unpack("<QQ", header[18:34])
        expected = HEADER_BYTES + 12 * n + 8 * d
        # megatron-core multimodal files carry one more int8 per sequence after doc_idx
        if file_size not in (expected, expected + n):
            raise DatasetFormatError(
                path, "file size", f"{expected} bytes (header says N={n} sequences, "
                f"D={d} document-index entries)", f"{file_size} bytes",
                "The index is truncated or its header is corrupt.")
        if d < 1:
            raise DatasetFormatError(path, "document count D", ">= 1", d)
        mm = np.frombuffer(np.memmap(path, dtype=np.uint8, mode="r"), np.uint8)
        self.sizes = np.frombuffer(mm, dtype="<i4", count=n, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(mm, dtype="<i8", count=n, offset=HEADER_BYTES + 4 * n)
        doc_idx = np.frombuffer(mm, dtype="<i8", count=d, offset=HEADER_BYTES + 12 * n)
        if n and self.sizes.min() < 0:
            raise DatasetFormatError(path, "sizes", "non-negative token counts",
                                     int(self.sizes.min()))
        if d == 1 and n > 0:
            # GPT-NeoX's merge_datasets.py never extends doc_idx; treat each sequence as a document.
            warnings.warn(f"{path}: doc_idx is [0] although there are {n} sequences (a GPT-NeoX "
                          f"merge); treating every sequence as one document.", stacklevel=3)
            doc_idx = np.arange(n + 1, dtype=np.int64)
        else:
            if doc_idx[0] != 0:
                raise DatasetFormatError(path, "doc_idx[0]", 0, int(doc_idx[0]))
            if doc_idx[-1] != n:
                raise DatasetFormatError(path, "doc_idx[-1]", f"N = {n}", int(doc_idx[-1]))
            if d > 1 and np.any(np.diff(doc_idx) < 0):
                raise DatasetFormatError(path, "doc_idx", "a non-decreasing sequence",
                                         "a decreasing step")
        self.doc_idx = doc_idx

    def _check_bin(self) -> None:
        n = len(self.sizes)
        itemsize = self.dtype.itemsize
        total = int(self.sizes.sum(dtype=np.int64)) * itemsize
        bin_size = os.path.getsize(self.bin_path)
        if bin_size != total:
            raise DatasetFormatError(self.bin_path, "file size", f"{total} bytes (sum of sizes in "
                                     f"{self.idx_path} x {itemsize}-byte {self.dtype.name})",
                                     f"{bin_size} bytes",
                                     "The .bin is truncated or does not belong to this .idx.")
        # Every pointer must be the byte offset its predecessors' sizes give. Both writers
        # (Megatron, GPT-NeoX) lay sequences out back to back, so any other value means swapped
        # or corrupt sizes/pointers — which would otherwise train on the wrong tokens silently.
        # One vectorised pass in slices, memory bounded: under 1 s per 10M sequences on a
        # loaded 2-core machine (benchmarks/bench_data_checks.py).
        offset = 0
        for lo in range(0, n, _POINTER_CHECK_CHUNK):
            sizes = self.sizes[lo:lo + _POINTER_CHECK_CHUNK].astype(np.int64) * itemsize
            expected = np.empty_like(sizes)
            expected[0] = offset
            np.cumsum(sizes[:-1], out=expected[1:])
            expected[1:] += offset
            bad = np.flatnonzero(self.pointers[lo:lo + len(sizes)] != expected)
            if bad.size:
                i = lo + int(bad[0])
                raise DatasetFormatError(
                    self.idx_path, f"pointers[{i}]", f"{int(expected[bad[0]])} (the byte offset "
                    f"that sizes[0..{i - 1}] give)", int(self.pointers[i]),
                    "The sizes or pointers of the index are swapped or corrupt; rebuild it "
                    "with tools/preprocess_data.py.")
            offset += int(sizes.sum())

    # ---- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.sizes

    @property
    def document_indices(self) -> np.ndarray:
        return self.doc_idx

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __getitem__(self, idx: Union[int, slice]):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1).")
            return [self[i] for i in range(start, stop)]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({n} sequences)")
        size = int(self.sizes[i])
        offset = int(offset)
        if length is None:
            length = size - offset
        length = int(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: get({i}, offset={offset}, length={length}) is "
                             f"outside sequence {i} of {size} tokens")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return self._bin[start:start + length * self.dtype.itemsize].view(self.dtype)

    def all_tokens(self) -> np.ndarray:
        """Every token of the ``.bin`` in file order (a view, no copy)."""
        return self._bin.view(self.dtype)

    def document(self, k: int) -> np.ndarray:
        """All tokens of document k (its sequences concatenated)."""
        lo, hi = int(self.doc_idx[k]), int(self.doc_idx[k + 1])
        if hi - lo == 1:
            return self.get(lo)
        return np.concatenate([self.get(i) for i in range(lo, hi)]) if hi > lo else \
            np.zeros(0, self.dtype)

    def __repr__(self) -> str:
        return (f"IndexedDataset('{self.prefix}', sequences={len(self)}, "
                f"documents={self.num_documents}, dtype={self.dtype.name})")
