"""Sample-index construction: pythia mode vs an independent re-implementation of GPT-NeoX's
algorithm, megatron mode vs megatron-core's own GPTDataset / BlendedDataset, and splits."""
import math
import warnings

import numpy as np
import pytest

from conftest_data import random_corpus
from megaponder.config import DataConfig
from megaponder.data import (GPTDataset, IndexedDataset, IndexedDatasetBuilder,
                             build_blending_indices, build_pythia_indices, build_train_valid_datasets)
from megaponder.data.sample_index import split_ranges_megatron, split_ranges_pythia


# ---- an independent, literal transcription of GPT-NeoX (gpt2_dataset.py + helpers.cpp) -----
def neox_num_epochs(tokens_per_epoch, seq_length, num_samples):
    num_epochs, total_tokens = 0, 0
    while True:
        num_epochs += 1
        total_tokens += tokens_per_epoch
        if ((total_tokens - 1) // seq_length) >= num_samples:
            return num_epochs


def neox_build_index_mappings(sizes, documents, seq_length, num_samples, seed):
    tokens_per_epoch = int(np.sum(sizes[documents]))
    num_epochs = neox_num_epochs(tokens_per_epoch, seq_length, num_samples)
    np_rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:num_epochs, 0:len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    np_rng.shuffle(doc_idx)
    n = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros((n + 1, 2), dtype=np.int64)
    sample_index, doc_idx_index, doc_offset = 0, 0, 0
    sample_idx[0] = (0, 0)
    sample_index = 1
    while sample_index <= n:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    shuffle_idx = np.arange(0, n, 1, dtype=np.uint32)
    np_rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def neox_getitem(ds, doc_idx, sample_idx, shuffle_idx, idx):
    idx = shuffle_idx[idx]
    f, l = sample_idx[idx][0], sample_idx[idx + 1][0]
    of, ol = sample_idx[idx][1], sample_idx[idx + 1][1]
    if f == l:
        return ds.get(doc_idx[f], offset=of, length=ol - of + 1)
    parts = [ds.get(doc_idx[f], offset=of)] + [ds.get(doc_idx[i]) for i in range(f + 1, l)]
    parts.append(ds.get(doc_idx[l], length=ol + 1))
    return np.concatenate(parts)


def _toy(tmp_path, name="toy", n_docs=120, seed=0, with_empty=True):
    rng = np.random.default_rng(seed)
    docs = random_corpus(rng, n_docs, max_len=50, vocab=500)
    if with_empty:
        docs[3] = np.zeros(0, np.int64)
        docs[4] = np.zeros(0, np.int64)
    prefix = str(tmp_path / name)
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:
        b.add_item(d)
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("seq_length,num_samples,seed", [(16, 10, 1), (16, 300, 2), (7, 3000, 3),
                                                         (64, 500, 1234)])
def test_pythia_matches_neox(tmp_path, seq_length, num_samples, seed):
    ds = IndexedDataset(_toy(tmp_path))
    documents = np.arange(5, 110, dtype=np.int32)
    ours = build_pythia_indices(ds.sizes, documents, seq_length, num_samples, seed)
    ref = neox_build_index_mappings(ds.sizes, documents, seq_length, num_samples, seed)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    g = GPTDataset(ds, documents, num_samples, seq_length, seed, mode="pythia")
    for i in (0, 1, len(g) // 2, len(g) - 1):
        expect = neox_getitem(ds, *ref, i)
        assert len(expect) == seq_length + 1
        np.testing.assert_array_equal(g[i]["tokens"], expect)


def test_split_ranges():
    # GPT-NeoX pushes the rounding excess onto every boundary; megatron rounds each bookend
    assert split_ranges_pythia("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges_pythia("1,1,1", 10) == [(0, 3), (3, 6), (6, 10)] or \
        split_ranges_pythia("1,1,1", 10)[-1][1] == 10
    assert split_ranges_megatron("98,1,1", 120) == [(0, 118), (118, npround(0.99 * 120)), (119, 120)]
    with pytest.raises(ValueError, match="969,30,1"):
        split_ranges_pythia("a,b", 10)


def npround(x):
    return int(round(x))


# ---- megatron-core as the reference ----------------------------------------------------------
class _StubTokenizer:
    def __init__(self):
        self.eod, self.pad, self.vocab_size = 0, 1, 500
        self.unique_identifiers = {"class": "stub"}


def _megatron_build(blend, sizes, seq_length, seed, tmp_path, split="90,8,2", cache=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset as MGPT, GPTDatasetConfig
    cfg = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=blend, split=split,
                           tokenizer=_StubTokenizer(), reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False,
                           path_to_cache=str(tmp_path / "mcache") if cache else None, mid_level_dataset_surplus=0.005)
    return BlendedMegatronDatasetBuilder(MGPT, sizes, lambda: True, cfg).build()


@pytest.mark.parametrize("seq_length,n_train,n_valid", [(16, 50, 10), (16, 400, 30), (32, 700, 5)])
def test_megatron_matches_megatron_core(tmp_path, seq_length, n_train, n_valid):
    prefix = _toy(tmp_path)
    m_train, m_valid, _ = _megatron_build(([prefix], None), [n_train, n_valid, 1], seq_length, 7,
                                          tmp_path)
    cfg = DataConfig(path=[prefix], split="90,8,2", seq_length=seq_length, index_mode="megatron",
                     index_cache_dir=str(tmp_path / "ours"))
    train, valid = build_train_valid_datasets(cfg, 7, n_train, n_valid)
    for ours, theirs in ((train, m_train), (valid, m_valid)):
        np.testing.assert_array_equal(ours.doc_idx, theirs.document_index)
        np.testing.assert_array_equal(ours.sample_idx, theirs.sample_index)
        np.testing.assert_array_equal(ours.shuffle_idx, theirs.shuffle_index)
        assert ours.sample_idx.dtype == theirs.sample_index.dtype
        for i in (0, len(theirs) // 2, len(theirs) - 1):
            t = theirs[i]
            np.testing.assert_array_equal(ours[i]["tokens"][:-1], t["tokens"].numpy())
            np.testing.assert_array_equal(ours[i]["tokens"][1:], t["labels"].numpy())


def test_megatron_blend_matches_megatron_core(tmp_path):
    a, b = _toy(tmp_path, "a", seed=1), _toy(tmp_path, "b", n_docs=80, seed=2, with_empty=False)
    m_train, m_valid, _ = _megatron_build(([a, b], [0.3, 0.7]), [300, 20, 1], 16, 5, tmp_path,
                                          cache=False)  # its cached blend needs torch.distributed
    cfg = DataConfig(path=["0.3", a, "0.7", b], split="90,8,2", seq_length=16,
                     index_mode="megatron", index_cache_dir=str(tmp_path / "ours"))
    train, valid = build_train_valid_datasets(cfg, 5, 300, 20)
    for ours, theirs in ((train, m_train), (valid, m_valid)):
        assert len(ours) == len(theirs)
        np.testing.assert_array_equal(ours.dataset_index, theirs.dataset_index)
        np.testing.assert_array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
        for k in range(2):
            np.testing.assert_array_equal(ours.datasets[k].shuffle_idx, theirs.datasets[k].shuffle_index)
        for i in (0, 1, 2, len(ours) - 1):
            np.testing.assert_array_equal(ours[i]["tokens"][:-1], theirs[i]["tokens"].numpy())


def test_blending_indices_match_helpers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
    for weights, size in (([0.5, 0.5], 11), ([0.3, 0.5, 0.2], 1000), ([0.01, 0.99], 333)):
        di, si = build_blending_indices(weights, size)
        rdi, rsi = np.zeros(size, np.int16), np.zeros(size, np.int64)
        helpers.build_blending_indices(rdi, rsi, np.array(weights), len(weights), size, False)
        np.testing.assert_array_equal(di, rdi)
        np.testing.assert_array_equal(si, rsi)


def test_index_cache_named_by_content_and_reused(tmp_path):
    prefix = _toy(tmp_path)
    ds = IndexedDataset(prefix)
    docs = np.arange(len(ds), dtype=np.int32)
    cache = str(tmp_path / "cache")
    g1 = GPTDataset(ds, docs, 100, 16, 1, cache_dir=cache)
    g2 = GPTDataset(ds, docs, 100, 16, 1, cache_dir=cache)
    assert g1.cache_paths == g2.cache_paths and isinstance(g2.shuffle_idx, np.memmap)
    np.testing.assert_array_equal(g1.shuffle_idx, g2.shuffle_idx)
    g3 = GPTDataset(ds, docs, 100, 16, 2, cache_dir=cache)     # another seed: another entry
    assert g3.cache_paths["shuffle_idx"] != g1.cache_paths["shuffle_idx"]
    import json
    desc = json.load(open(g1.cache_paths["description"]))
    assert desc["seed"] == 1 and desc["mode"] == "pythia" and desc["num_samples"] == 100


def test_tiny_split_and_short_data_errors(tmp_path):
    prefix = _toy(tmp_path, n_docs=10)
    cfg = DataConfig(path=[prefix], split="100,0,0", seq_length=16, index_cache_dir=str(tmp_path / "c"))
    train, valid = build_train_valid_datasets(cfg, 1, 20, 5)
    assert valid is None and len(train) >= 20
    ds = IndexedDataset(prefix)
    with pytest.raises(ValueError, match="at least 2"):
        GPTDataset(ds, np.array([3, 4], np.int32), 5, 16, 1)     # both documents empty
