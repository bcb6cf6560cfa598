"""MMIDIDX .bin/.idx: byte compatibility with megatron-core, merges, and format errors."""
import os
import struct

import numpy as np
import pytest
import torch

from conftest_data import megatron_indexed, random_corpus
from megaponder.data import DatasetFormatError, IndexedDataset, IndexedDatasetBuilder
from megaponder.data.indexed import DTYPE_CODES, best_token_dtype, write_index


def _write_ours(prefix, docs, dtype, seqs_per_doc=1):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        if seqs_per_doc == 1:
            b.add_item(d)
            b.end_document()
        else:
            cut = len(d) // 2
            b.add_document(d, [cut, len(d) - cut])
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_our_files(tmp_path, dtype):
    mi = megatron_indexed()
    docs = random_corpus(np.random.default_rng(0), 50, vocab=60000, min_len=12)
    prefix = str(tmp_path / "ours")
    _write_ours(prefix, docs, dtype, seqs_per_doc=2)
    theirs = mi.IndexedDataset(prefix)
    ours = IndexedDataset(prefix)
    assert len(theirs) == len(ours) == 100
    np.testing.assert_array_equal(theirs.document_indices, ours.doc_idx)
    np.testing.assert_array_equal(theirs.sequence_lengths, ours.sizes)
    for i in range(len(ours)):
        np.testing.assert_array_equal(theirs[i], ours[i])
    np.testing.assert_array_equal(theirs.get(7, offset=2, length=3), ours.get(7, 2, 3))
    assert theirs[0].dtype == ours[0].dtype == np.dtype(dtype)


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_we_read_megatron_files_every_dtype(tmp_path, code):
    mi = megatron_indexed()
    dtype = np.dtype(DTYPE_CODES[code])
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 3, 0, 9)]
    prefix = str(tmp_path / "theirs")
    b = mi.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype.type)
    for d in docs:
        b.add_item(torch.from_numpy(d.astype(np.float64 if dtype.kind == "f" else np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == dtype and ours.dtype_code == code
    np.testing.assert_array_equal(ours.doc_idx, [0, 1, 2, 3, 4])
    for d, got in zip(docs, ours):
        np.testing.assert_array_equal(got, d)


def test_worked_example_bytes(tmp_path):
    # the MMIDIDX layout (docs/data.md): two documents of 5 and 3 uint16 tokens -> 16-byte .bin, 82-byte .idx
    prefix = str(tmp_path / "ex")
    _write_ours(prefix, [np.arange(5), np.arange(3)], np.uint16)
    assert os.path.getsize(prefix + ".bin") == 16
    raw = open(prefix + ".idx", "rb").read()
    assert len(raw) == 82 and raw[:9] == b"MMIDIDX\x00\x00" and raw[17] == 8
    assert struct.unpack("<QQ", raw[18:34]) == (2, 3)


def test_merge_shifts_doc_idx_and_megatron_agrees(tmp_path):
    mi = megatron_indexed()
    rng = np.random.default_rng(1)
    a, b = random_corpus(rng, 4), random_corpus(rng, 3)
    _write_ours(str(tmp_path / "a"), a, np.uint16)
    _write_ours(str(tmp_path / "b"), b, np.uint16, seqs_per_doc=2)
    m = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    m.add_index(str(tmp_path / "a"))
    m.add_index(str(tmp_path / "b"))
    m.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(str(tmp_path / "m"))
    np.testing.assert_array_equal(ours.doc_idx, [0, 1, 2, 3, 4, 6, 8, 10])
    theirs = mi.IndexedDataset(str(tmp_path / "m"))
    np.testing.assert_array_equal(theirs.document_indices, ours.doc_idx)
    np.testing.assert_array_equal(np.concatenate(list(ours)), np.concatenate(a + b))


def test_neox_merge_with_doc_idx_zero_is_tolerated(tmp_path):
    # GPT-NeoX's merge_file_ leaves doc_idx == [0]; megatron-core rejects it, we reconstruct
    prefix = str(tmp_path / "neox")
    docs = [np.arange(4), np.arange(6)]
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(d.astype(np.uint16).tobytes())
    write_index(prefix + ".idx", np.uint16, [4, 6], [0])
    with pytest.warns(UserWarning, match="doc_idx is \\[0\\]"):
        ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds.doc_idx, [0, 1, 2])
    np.testing.assert_array_equal(ds[1], np.arange(6))


def test_best_dtype_rule():
    assert best_token_dtype(8192) == np.uint16
    assert best_token_dtype(50280) == np.uint16
    assert best_token_dtype(65500) == np.int32
    assert best_token_dtype(None) == np.int32


@pytest.fixture
def small(tmp_path):
    prefix = str(tmp_path / "small")
    _write_ours(prefix, [np.arange(5), np.arange(3)], np.uint16)
    return prefix


def test_truncated_bin(small):
    with open(small + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DatasetFormatError) as e:
        IndexedDataset(small)
    assert e.value.field == "file size" and e.value.path.endswith(".bin")
    assert "16 bytes" in str(e.value) and "10 bytes" in str(e.value)


def test_truncated_idx(small):
    with open(small + ".idx", "r+b") as f:
        f.truncate(60)
    with pytest.raises(DatasetFormatError, match=r"small\.idx: bad file size: expected 82 bytes"):
        IndexedDataset(small)


@pytest.mark.parametrize("offset,value,field", [
    (0, b"XXIDIDX\x00\x00", "magic"),
    (9, struct.pack("<Q", 7), "version"),
    (17, bytes([42]), "dtype code"),
    (18, struct.pack("<Q", 10 ** 6), "file size"),   # sequence count inflated
    (74, struct.pack("<q", 5), "doc_idx[-1]"),      # last doc_idx entry
])
def test_corrupted_idx_header(small, offset, value, field):
    with open(small + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(value)
    with pytest.raises(DatasetFormatError) as e:
        IndexedDataset(small)
    assert e.value.field == field
    assert str(e.value).startswith(small + ".idx: bad " + field)


def test_legacy_format_rejected(tmp_path):
    prefix = str(tmp_path / "legacy")
    open(prefix + ".bin", "wb").close()
    with open(prefix + ".idx", "wb") as f:
        f.write(b"TNTIDX\x00\x00" + struct.pack("<QQQ", 1, 4, 4))
    with pytest.raises(DatasetFormatError, match="legacy"):
        IndexedDataset(prefix)


def test_missing_files_and_bad_access(small):
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        IndexedDataset(small + "_nope")
    ds = IndexedDataset(small)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds.get(0, 3, 5)
    assert repr(ds).startswith("IndexedDataset(") and ds.num_tokens == 8
