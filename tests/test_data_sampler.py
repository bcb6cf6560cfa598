"""Data-parallel order and resume: a resumed run sees exactly what an uninterrupted one would."""
import numpy as np
import pytest
import torch

from conftest_data import random_corpus
from megaponder.config import DataConfig
from megaponder.data import (IndexedDatasetBuilder, MicroBatchSampler, build_data_iterator,
                             build_train_valid_datasets, step_micro_batches)


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampler")
    prefix = str(tmp / "corpus")
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in random_corpus(np.random.default_rng(0), 200, max_len=30, vocab=300):
        b.add_item(np.append(d, 0))  # EOD = 0 closes every document
        b.end_document()
    b.finalize(prefix + ".idx")
    cfg = DataConfig(path=[prefix], split="95,5,0", seq_length=12, index_cache_dir=str(tmp / "c"))
    train, _ = build_train_valid_datasets(cfg, 1234, 100, 10)
    return train


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_mid_epoch_equals_uninterrupted(train_ds, dp_size):
    mbs, steps_before, steps_after = 3, 5, 40        # 40 more steps wrap past the dataset end
    full = {r: _take(build_data_iterator(train_ds, mbs, r, dp_size, 0), steps_before + steps_after)
            for r in range(dp_size)}
    consumed = steps_before * mbs * dp_size
    for r in range(dp_size):
        resumed = _take(build_data_iterator(train_ds, mbs, r, dp_size, consumed), steps_after)
        for a, b in zip(full[r][steps_before:], resumed):
            assert torch.equal(a, b)
    # ranks see disjoint, contiguous slices of the same global order
    if dp_size == 2:
        single = _take(build_data_iterator(train_ds, mbs * 2, 0, 1, 0), 3)
        for k in range(3):
            assert torch.equal(torch.cat([full[0][k], full[1][k]]), single[k])


def test_batches_are_long_tensors_of_seq_plus_one(train_ds):
    batch = next(build_data_iterator(train_ds, 4, 0, 1, 0))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (4, 13)
    assert torch.equal(batch["tokens"][0], torch.from_numpy(train_ds[0]["tokens"]))


def test_step_micro_batches_and_validation():
    got = step_micro_batches(step=2, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2,
                             dataset_len=100)
    assert [g.tolist() for g in got] == [[18, 19], [22, 23]]
    it = iter(MicroBatchSampler(100, 2, 1, 2, consumed_samples=16))
    assert next(it) == [18, 19] and next(it) == [22, 23]
    with pytest.raises(ValueError, match="multiple"):
        MicroBatchSampler(100, 2, 0, 2, consumed_samples=3)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchSampler(100, 2, 2, 2)


def test_worker_processes_give_the_same_batches(train_ds):
    a = _take(build_data_iterator(train_ds, 2, 0, 1, 4), 3)
    b = _take(build_data_iterator(train_ds, 2, 0, 1, 4, num_workers=1), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
