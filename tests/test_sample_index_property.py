"""The sample index (megaponder.data.sample_index): its compiled extension, its numpy path, the
searchsorted construction it replaced and megatron-core's compiled greedy walk give the same rows,
on random corpora with empty documents, documents longer than seq_length, partial last samples
and multiple epochs (with megatron's separately shuffled final epoch); plus the edge cases, the
errors, and a check that the extension was built wherever a C compiler is present."""
import os
import shutil
import sysconfig
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from megaponder.data import sample_index
from megaponder.data.sample_index import (INT32_MAX, build_megatron_indices, build_pythia_indices,
                                          build_sample_idx, num_epochs_megatron, numpy_sample_index)


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
        # integer rows: the extension and numpy must agree exactly (no tolerance), and for every
        # input/output width the loaders and the .npy caches can hand in
        for out_dtype, in_dtype in ((np.int32, np.int64), (np.int64, np.int32),
                                    (np.int64, np.int64)):
            wide = build_sample_idx(sizes.astype(in_dtype), doc_idx.astype(in_dtype), seq, n,
                                    out_dtype, drop_last=drop_last)
            assert wide.dtype == out_dtype
            np.testing.assert_array_equal(wide, ours)
        with numpy_sample_index():
            np.testing.assert_array_equal(build_sample_idx(sizes, doc_idx, seq, n,
                                                           drop_last=drop_last), ours)
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


def both_paths():
    """The builds under test: the extension (where built) and the numpy path."""
    return [pytest.param(False, id="compiled",
                         marks=pytest.mark.skipif(sample_index._compiled is None,
                                                  reason="extension not built")),
            pytest.param(True, id="numpy")]


def build(force_numpy, *args, **kwargs):
    if force_numpy:
        with numpy_sample_index():
            return build_sample_idx(*args, **kwargs)
    return build_sample_idx(*args, **kwargs)


@pytest.mark.parametrize("force_numpy", both_paths())
def test_sample_idx_edge_cases(force_numpy):
    helpers = _helpers()
    # empty first documents (row 0 is still (0, 0)), trailing empty documents with drop_last=False
    # (megatron's final row then has offset -1), one document, a sample exactly on a boundary
    for sizes_list, seq in (([0, 0, 7, 3], 4), ([5, 4, 0, 0], 3), ([9], 2), ([4, 4, 4], 4)):
        sizes = np.asarray(sizes_list, dtype=np.int32)
        doc_idx = np.arange(len(sizes), dtype=np.int32)
        tokens = int(sizes.sum())
        for drop_last in (True, False):
            n = (tokens - 1) // seq if drop_last else -(-(tokens - 1) // seq)
            ours = build(force_numpy, sizes, doc_idx, seq, n, drop_last=drop_last)
            ref = helpers.build_sample_idx_int32(sizes, doc_idx, seq, 1, tokens, drop_last, 1)
            np.testing.assert_array_equal(ours, ref)
            assert tuple(ours[0]) == (0, 0)
    # a uint16 sizes array (other widths are widened before the extension sees them)
    sizes = np.array([3, 0, 6, 2], dtype=np.uint16)
    doc_idx = np.array([2, 0, 1, 3, 2], dtype=np.int32)
    np.testing.assert_array_equal(build(force_numpy, sizes, doc_idx, 3, 5),
                                  searchsorted_sample_idx(sizes, doc_idx, 3, 5))
    # rows past the stream (more samples than the stream holds): owned by the end of the stream
    np.testing.assert_array_equal(build(force_numpy, sizes, doc_idx, 3, 9),
                                  searchsorted_sample_idx(sizes, doc_idx, 3, 9))


@pytest.mark.parametrize("force_numpy", both_paths())
def test_sample_idx_errors(force_numpy):
    sizes = np.array([3, 4, 5], dtype=np.int32)
    # both paths name the first bad entry, including a negative one numpy indexing would wrap
    for bad, pos in (([0, 3, 1], 1), ([2, 1, -1], 2)):
        with pytest.raises(IndexError, match=rf"doc_idx\[{pos}\] = {bad[pos]} is not a document"):
            build(force_numpy, sizes, np.array(bad, dtype=np.int32), 2, 3)
    with pytest.raises(TypeError, match="dtype must be int32 or int64"):
        build(force_numpy, sizes, np.arange(3, dtype=np.int32), 2, 3, dtype=np.float32)
    # today's int32/int64 choice stays the caller's, but an int32 index too narrow for the
    # positions in doc_idx is refused instead of wrapping (a zero-stride view: no 8 GiB array)
    too_long = np.broadcast_to(np.int32(0), (INT32_MAX + 1,))
    with pytest.raises(OverflowError, match="pass dtype=np.int64"):
        build(force_numpy, sizes, too_long, 2, 3)


@pytest.mark.skipif(sample_index._compiled is None, reason="extension not built")
def test_extension_rejects_bad_buffers():
    fill = sample_index._compiled.fill_sample_idx
    sizes, doc_idx = np.array([3, 4], dtype=np.int32), np.array([0, 1], dtype=np.int32)
    out = np.empty((4, 2), dtype=np.int32)
    assert fill(sizes, doc_idx, 2, out) == 7  # the stream's token count
    with pytest.raises(TypeError, match="sizes must be a 1-d C-contiguous int32 or int64"):
        fill(sizes.astype(np.float64), doc_idx, 2, out)
    with pytest.raises(TypeError, match="out must be a 2-d"):
        fill(sizes, doc_idx, 2, out.ravel())
    with pytest.raises(ValueError, match="out must have 2 columns"):
        fill(sizes, doc_idx, 2, np.empty((4, 3), dtype=np.int32))
    # numpy's own buffer errors (build_sample_idx hands in contiguous, writable arrays)
    with pytest.raises(ValueError, match="not C-contiguous"):
        fill(np.arange(8, dtype=np.int32)[::2], doc_idx, 2, out)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fill(sizes, doc_idx, 2, out)
    with pytest.raises(ValueError, match="seq_length must be positive"):
        fill(sizes, doc_idx, 0, np.empty((4, 2), dtype=np.int32))


def test_extension_built_where_a_compiler_is():
    """CI must not silently fall back to numpy: where setuptools can compile (a C compiler and
    the Python headers), `pip install -e .` builds the extension and it must import."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which(compiler) and os.path.exists(headers)):
        pytest.skip(f"no C compiler ({compiler}) or no Python.h: the numpy path is expected")
    assert sample_index._compiled is not None, (
        f"{compiler} and Python.h are present but megaponder.data._sample_index did not import; "
        f"rebuild it with `pip install --no-deps -e .` (or `python setup.py build_ext --inplace`)")
