"""megaponder.data — Megatron/GPT-NeoX indexed datasets, tokenizers and packed GPT samples.

Public API (the trainer's entry points first)::

    from megaponder.data import build_train_valid_datasets, build_data_iterator

    train_ds, valid_ds = build_train_valid_datasets(cfg.data, seed=cfg.train.seed,
                                                    num_train_samples=steps * global_batch,
                                                    num_valid_samples=n_valid)
    # valid_ds is None when there is no validation data.
    # ds[i] -> {"tokens": int64[seq_length+1]}
    #          + "position_ids" (int64[S+1], restart after EOD)   if data.reset_position_ids
    #          + "segment_ids"  (int64[S+1], document # in row)   if data.reset_attention_mask
    batches = build_data_iterator(train_ds, micro_batch_size, dp_rank, dp_size,
                                  consumed_samples=step * global_batch, num_workers=0)
    batch = next(batches)   # dict of torch.LongTensor [micro_batch_size, seq_length+1], forever
    # inputs = batch["tokens"][:, :-1], labels = batch["tokens"][:, 1:]

The sample order depends on (data, seed, num_train_samples, seq_length, index_mode) and the
consumed count only — not on micro-batch size or dp size — so resuming with
``consumed_samples = step * global_batch`` continues exactly where the run stopped.

Lower level::

    IndexedDataset(prefix)            len(), ds[i] -> np tokens, ds.get(i, offset, length),
                                      ds.sizes, ds.doc_idx, ds.pointers, ds.dtype
    IndexedDatasetBuilder(bin_path, dtype)   add_item / end_document / add_document /
                                             add_index(prefix) / finalize(idx_path)
    DatasetFormatError                bad .bin/.idx: names file, field, expected, found
    build_tokenizer(type, path)       .encode(str)->list[int], .decode, .vocab_size, .eod, .pad
    GPTDataset, BlendedDataset        what build_train_valid_datasets returns
    build_pythia_indices / build_megatron_indices   (doc_idx, sample_idx, shuffle_idx)
    MicroBatchSampler, step_micro_batches           data-parallel order / resume
    packing: position_ids, segment_ids, cu_seqlens, block_causal_mask, gather_active,
             scatter_active

Formats, tools and error messages: docs/data.md.
"""
from .blending import BlendedDataset, build_blending_indices
from .gpt_dataset import GPTDataset, build_data_iterator, build_train_valid_datasets, collate
from .indexed import (DatasetFormatError, IndexedDataset, IndexedDatasetBuilder, best_token_dtype,
                      get_bin_path, get_idx_path)
from .packing import (block_causal_mask, cu_seqlens, gather_active, position_ids, scatter_active,
                      segment_ids)
from .sample_index import build_megatron_indices, build_pythia_indices
from .sampler import MicroBatchSampler, step_micro_batches
from .tokenizer import build_tokenizer

__all__ = [
    "BlendedDataset", "DatasetFormatError", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder",
    "MicroBatchSampler", "best_token_dtype", "block_causal_mask", "build_blending_indices",
    "build_data_iterator", "build_megatron_indices", "build_pythia_indices", "build_tokenizer",
    "build_train_valid_datasets", "collate", "cu_seqlens", "gather_active", "get_bin_path",
    "get_idx_path", "position_ids", "scatter_active", "segment_ids", "step_micro_batches",
]
