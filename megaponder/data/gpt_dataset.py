"""Packed GPT samples over indexed datasets, with splits, blending, caching and the data iterator.

The trainer needs two calls (see ``megaponder/data/__init__.py`` for the contract):

    train_ds, valid_ds = build_train_valid_datasets(cfg.data, seed, num_train_samples, num_valid_samples)
    batches = build_data_iterator(train_ds, micro_batch_size, dp_rank, dp_size, consumed_samples)
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from . import index_cache
from .blending import BlendedDataset, normalize, per_dataset_samples
from .indexed import IndexedDataset
from .packing import position_ids, segment_ids
from .sample_index import (build_megatron_indices, build_pythia_indices, read_sample,
                           split_ranges_megatron, split_ranges_pythia)
from .sampler import MicroBatchSampler

logger = logging.getLogger("megaponder.data")
SPLIT_NAMES = ("train", "valid", "test")
INDEX_MODES = ("pythia", "megatron")


class GPTDataset:
    """``num_samples``(+) packed samples of ``seq_length + 1`` tokens from the sequences
    ``documents`` of ``dataset``.

    ``ds[i]`` → ``{"tokens": int64[S+1]}`` plus ``"position_ids"`` (restarting after each EOD)
    when ``reset_position_ids`` and ``"segment_ids"`` (document number within the sample, for a
    block-diagonal mask / cu_seqlens) when ``reset_attention_mask``. ``len(ds)`` is the number of
    samples the indices hold (>= num_samples)."""

    def __init__(self, dataset: IndexedDataset, documents: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, mode: str = "pythia", name: str = "train",
                 cache_dir: Optional[str] = None, eod: Optional[int] = None, pad: int = 0,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 drop_last: bool = True):
        if mode not in INDEX_MODES:
            raise ValueError(f"index mode '{mode}' is not one of {INDEX_MODES}")
        if (reset_position_ids or reset_attention_mask) and eod is None:
            raise ValueError("reset_position_ids/reset_attention_mask need the tokenizer's EOD id "
                             "(set data.tokenizer_model).")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.dataset, self.seq_length, self.mode, self.name = dataset, seq_length, mode, name
        self.eod, self.pad = eod, pad
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        documents = np.asarray(documents, dtype=np.int32)
        if len(documents) == 0:
            raise ValueError(f"{dataset.prefix}: the {name} split selects no sequences.")
        doc_range = (int(documents[0]), int(documents[-1]) + 1)
        self.description = index_cache.describe(mode, dataset.prefix, dataset.sizes, doc_range,
                                                name, seq_length, num_samples, seed, drop_last)

        def build():
            if mode == "pythia":
                return build_pythia_indices(dataset.sizes, documents, seq_length, num_samples, seed)
            return build_megatron_indices(dataset.sizes, documents, seq_length, num_samples, seed,
                                          drop_last=drop_last)

        (self.doc_idx, self.sample_idx, self.shuffle_idx), self.cache_paths = \
            index_cache.load_or_build(cache_dir, self.description, build, log=logger.info,
                                      sizes=dataset.sizes)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def sample_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64[S+1], source sequence id per token) of sample i (after shuffling)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples in {self.name})")
        return read_sample(self.dataset, self.doc_idx, self.sample_idx, int(self.shuffle_idx[i]),
                           self.seq_length + 1, pad=self.pad)

    def __getitem__(self, i: int) -> dict:
        tokens, _ = self.sample_tokens(int(i))
        item = {"tokens": tokens}
        if self.reset_position_ids:
            item["position_ids"] = position_ids(tokens, self.eod)
        if self.reset_attention_mask:
            item["segment_ids"] = segment_ids(tokens, self.eod)
        return item


# ---- config → datasets ----------------------------------------------------------------------
def parse_blend(paths: Optional[Sequence]) -> tuple[list[str], Optional[list[float]]]:
    """``[a, b]`` → ([a, b], None); ``[0.7, a, 0.3, b]`` → ([a, b], [0.7, 0.3])."""
    if not paths:
        return [], None
    items = [paths] if isinstance(paths, str) else list(paths)

    def is_number(x) -> bool:
        try:
            float(x)
            return True
        except (TypeError, ValueError):
            return False

    if len(items) >= 2 and is_number(items[0]):
        if len(items) % 2 or not all(is_number(w) for w in items[0::2]):
            raise DataError(f"data.path {items}: a weighted blend alternates weight, prefix, "
                             f"weight, prefix …")
        return [str(p) for p in items[1::2]], [float(w) for w in items[0::2]]
    return [str(p) for p in items], None


def _split_documents(ds: IndexedDataset, split: str, mode: str) -> list[np.ndarray]:
    ranges = (split_ranges_pythia if mode == "pythia" else split_ranges_megatron)(split, len(ds))
    return [np.arange(a, b, dtype=np.int32) for a, b in ranges]


def _cache_dir(data_cfg, prefix: str) -> str:
    return data_cfg.index_cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)),
                                                    "index-cache")


def _build_one_split(data_cfg, prefixes, weights, split_index, whole, seed, num_samples, eod, pad,
                     opened, bar):
    """One (possibly blended) dataset for split ``split_index`` (0 train, 1 valid, 2 test);
    ``opened(prefix)`` gives the IndexedDataset of a prefix; ``bar`` (tqdm) counts the indices
    built or loaded, one per dataset of the blend."""
    name = SPLIT_NAMES[split_index]
    mode = data_cfg.index_mode
    if weights is None and len(prefixes) > 1:
        # unweighted list: blend in proportion to each dataset's tokens (one pass over all of them)
        weights = [opened(p).num_tokens for p in prefixes]
    if len(prefixes) == 1:
        counts = [num_samples]
    else:
        weights = normalize(weights)
        counts = per_dataset_samples(weights, num_samples, mode)
    parts = []
    for k, (prefix, count) in enumerate(zip(prefixes, counts)):
        ds = opened(prefix)
        docs = (np.arange(len(ds), dtype=np.int32) if whole
                else _split_documents(ds, data_cfg.split, mode)[split_index])
        if len(docs) == 0:
            if len(prefixes) == 1:
                return None
            raise DataError(f"{prefix}.idx: data.split '{data_cfg.split}' leaves none of its "
                            f"{len(ds)} sequences for the {name} split of this blended dataset.")
        part_name = f"{name}{'_' + str(k) if len(prefixes) > 1 else ''}"
        bar.set_postfix_str(f"{part_name} {os.path.basename(prefix)}")
        parts.append(GPTDataset(ds, docs, count, data_cfg.seq_length, seed, mode, part_name,
                                _cache_dir(data_cfg, prefix), eod, pad, data_cfg.reset_position_ids,
                                data_cfg.reset_attention_mask))
        bar.update(1)
    if len(parts) == 1:
        return parts[0]
    size = sum(int(np.ceil(num_samples * w)) for w in weights) if mode == "megatron" else num_samples
    return BlendedDataset(parts, weights, size)


def build_train_valid_datasets(data_cfg, seed: int, num_train_samples: int,
                               num_valid_samples: int, datasets: Optional[dict] = None,
                               progress: bool = False):
    """(train_ds, valid_ds) from the ``data:`` config section; valid_ds is None when there is no
    validation data (valid_path null and the split's valid share rounds to zero sequences).
    ``datasets``: IndexedDatasets already open, by prefix (megaponder.data.checks.open_datasets);
    others are opened here. ``progress``: a bar on stderr over the doc/sample/shuffle indices
    built or loaded from the cache (one per dataset of each split; the rank that builds them).

    Under torch.distributed, global rank 0 builds missing index caches first and the other ranks
    load them afterwards (every rank must call this). A failure on any rank stops every rank
    with its message (megaponder.collectives) instead of leaving them in a barrier."""
    datasets = {} if datasets is None else datasets

    def opened(prefix: str) -> IndexedDataset:
        if prefix not in datasets:
            datasets[prefix] = IndexedDataset(prefix)
        return datasets[prefix]

    prefixes, weights = parse_blend(data_cfg.path)
    if not prefixes:
        raise DataError("data.path is empty; point it at a dataset prefix (e.g. "
                         "data/demo/train_text_document).")
    eod, pad = None, 0
    if data_cfg.reset_position_ids or data_cfg.reset_attention_mask:
        from .checks import data_tokenizer

        tok = data_tokenizer(data_cfg)
        eod, pad = tok.eod, tok.pad
    valid_prefixes, valid_weights = parse_blend(data_cfg.valid_path)

    def build_all(progress: bool):
        from tqdm import tqdm

        valid_parts = 0 if num_valid_samples <= 0 else len(valid_prefixes or prefixes)
        with tqdm(total=len(prefixes) + valid_parts, desc="sample index", unit="index",
                  file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            result = build_splits(bar)
            bar.total = bar.n  # a split left without sequences built nothing
            return result

    def build_splits(bar):
        whole_train = bool(valid_prefixes)  # separate validation data: train uses all of data.path
        train = _build_one_split(data_cfg, prefixes, weights, 0, whole_train, seed,
                                 num_train_samples, eod, pad, opened, bar)
        if train is None:
            n = len(opened(prefixes[0]))
            raise DataError(f"{prefixes[0]}.idx holds {n} sequence(s), and data.split "
                            f"'{data_cfg.split}' leaves none of them for training"
                            + (" (the dataset is empty: did preprocessing skip every record?)"
                               if n == 0 else "; give training a larger share or more data."))
        valid = None
        if num_valid_samples > 0:
            if valid_prefixes:
                valid = _build_one_split(data_cfg, valid_prefixes, valid_weights, 1, True, seed,
                                         num_valid_samples, eod, pad, opened, bar)
            else:
                valid = _build_one_split(data_cfg, prefixes, weights, 1, False, seed,
                                         num_valid_samples, eod, pad, opened, bar)
        return train, valid

    dist = _initialized_dist()
    if dist is None:
        return build_all(progress)
    from ..collectives import agree_on_failure

    first = dist.get_rank() == 0
    result = None
    # two agreed phases instead of a barrier: rank 0 writes the caches, then the others load them
    with agree_on_failure("building the sample index"):
        if first:
            result = build_all(progress)
    with agree_on_failure("loading the sample index"):
        if not first:
            result = build_all(False)  # only loads what rank 0 wrote
    return result


def _initialized_dist():
    torch = sys.modules.get("torch")  # do not import torch just to find out
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


# ---- batches --------------------------------------------------------------------------------
def collate(items: list[dict]) -> dict:
    import torch

    return {key: torch.from_numpy(np.stack([it[key] for it in items]).astype(np.int64))
            for key in items[0]}


def build_data_iterator(ds, micro_batch_size: int, dp_rank: int, dp_size: int,
                        consumed_samples: int = 0, num_workers: int = 0):
    """Endless iterator of this rank's micro-batches: dicts of int64 tensors [B, S+1].

    Batch k of rank r holds dataset items ``(consumed + k·B·D + r·B + [0, B)) mod len(ds)``; the
    model uses ``tokens[:, :-1]`` as input and ``tokens[:, 1:]`` as labels (same slicing for
    position_ids / segment_ids)."""
    sampler = MicroBatchSampler(len(ds), micro_batch_size, dp_rank, dp_size, consumed_samples)
    if num_workers <= 0:
        return (collate([ds[i] for i in idx]) for idx in sampler)
    import torch

    return iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=num_workers,
                                            collate_fn=collate, persistent_workers=True))
