"""Property test: the linear-count sample index (megaponder.data.sample_index) equals the previous
searchsorted construction and megatron-core's compiled greedy walk, on random corpora with empty
documents, documents longer than seq_length, partial last samples and multiple epochs (with
megatron's separately shuffled final epoch)."""
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from megaponder.data.sample_index import (INT32_MAX, build_megatron_indices, build_pythia_indices,
                                          build_sample_idx, num_epochs_megatron)


def searchsorted_sample_idx(sizes, doc_idx, seq_length, num_samples, dtype=np.int32,
                            drop_last=True, add_extra_token=1):
    """The construction megaponder shipped before the linear count, kept verbatim as reference."""
    doc_lengths = np.asarray(sizes)[doc_idx].astype(np.int64)
    starts = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=starts[1:])
    total = int(starts[-1])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    which = np.searchsorted(starts, positions, side="right") - 1
    offsets = positions - starts[which]
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[:, 0] = which
    out[:, 1] = offsets
    out[0] = (0, 0)
    if not drop_last and positions[-1] > total - add_extra_token:
        out[-1] = (len(doc_idx) - 1, int(doc_lengths[-1]) - add_extra_token)
    return out


def _helpers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
    return helpers


corpora = st.tuples(
    # sizes from 0 (empty documents) to well past seq_length; a non-empty last doc is not forced
    st.lists(st.integers(0, 90), min_size=1, max_size=40),
    st.integers(2, 40),          # seq_length
    st.integers(1, 400),         # requested samples (drives epochs: up to dozens on tiny corpora)
    st.integers(0, 2 ** 31 - 1),  # seed
).filter(lambda c: sum(c[0]) >= 2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora)
def test_sample_idx_equals_searchsorted_and_megatron_core(case):
    sizes_list, seq, n_req, seed = case
    sizes = np.asarray(sizes_list, dtype=np.int32)
    documents = np.arange(len(sizes), dtype=np.int32)
    helpers = _helpers()
    tokens = int(sizes.sum())
    epochs = num_epochs_megatron(tokens, seq, n_req)
    doc_idx = np.random.RandomState(seed).permutation(np.tile(documents, epochs)).astype(np.int32)
    for drop_last in (True, False):
        n = (epochs * tokens - 1) // seq if drop_last else -(-(epochs * tokens - 1) // seq)
        ours = build_sample_idx(sizes, doc_idx, seq, n, drop_last=drop_last)
        np.testing.assert_array_equal(ours, searchsorted_sample_idx(sizes, doc_idx, seq, n,
                                                                    drop_last=drop_last))
        # the compiled walk itself: its Python wrapper asserts offsets >= 0, which megatron's own
        # drop_last=False row breaks (offset -1) when the stream ends on an empty document
        ref = helpers.build_sample_idx_int32(sizes, doc_idx, seq, epochs, tokens, drop_last, 1)
        np.testing.assert_array_equal(ours, ref)
    # the full builders (megatron's separate final-epoch shuffle, pythia's epoch rule) end to end
    for drop_last in (True, False):
        doc, sample, shuffle = build_megatron_indices(sizes, documents, seq, n_req, seed, drop_last)
        np.testing.assert_array_equal(sample, searchsorted_sample_idx(
            sizes, doc, seq, len(sample) - 1, sample.dtype, drop_last=drop_last))
    doc, sample, _ = build_pythia_indices(sizes, documents, seq, n_req, seed)
    np.testing.assert_array_equal(sample, searchsorted_sample_idx(sizes, doc, seq, len(sample) - 1,
                                                                  sample.dtype))


def test_sample_idx_int64_rows():
    # dtype=int64 (the >2^31 rows case upstream) keeps values and dtype; the doc column never
    # overflows int32 here but the output dtype follows the caller
    sizes = np.array([0, 5, 300, 1, 0, 77], dtype=np.int32)
    doc_idx = np.tile(np.arange(6, dtype=np.int32), 3)
    n = (int(sizes.sum()) * 3 - 1) // 16
    ours = build_sample_idx(sizes, doc_idx, 16, n, dtype=np.int64)
    assert ours.dtype == np.int64 and INT32_MAX > 0
    np.testing.assert_array_equal(ours, searchsorted_sample_idx(sizes, doc_idx, 16, n, np.int64))
