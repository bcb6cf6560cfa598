"""Bad inputs give one clear error naming the file or key: .idx consistency, token ids vs the
vocabulary, another tokenizer, empty datasets; preprocessing never destroys previous outputs and
skips records its tokenizer rejects."""
import json
import os
import struct

import numpy as np
import pytest

from conftest_data import demo_corpus_dir, neox_tokenizer_json, write_jsonl
from megaponder.config import config_from_dict
from megaponder.data import DatasetFormatError, IndexedDataset, IndexedDatasetBuilder
from megaponder.data.checks import check_data_fits, meta_path, read_meta
from megaponder.data.indexed import HEADER_BYTES
from megaponder.data.preprocess import preprocess
from megaponder.errors import DataError, UserError


def _write(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_item(np.asarray(d))
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def _cfg(prefix, vocab=8192, tokenizer=None, tokenizer_type="SentencePieceTokenizer"):
    return config_from_dict({"model": {"vocab_size": vocab},
                             "data": {"path": [prefix], "tokenizer_model": tokenizer,
                                      "tokenizer_type": tokenizer_type}}, check_paths=False)


def _quiet(**kw):
    return dict(progress=False, out=open(os.devnull, "w"), err=open(os.devnull, "w"), **kw)


# ---- .idx consistency ---------------------------------------------------------------------
def test_swapped_sizes_are_refused_naming_the_idx(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    idx = prefix + ".idx"
    raw = bytearray(open(idx, "rb").read())
    sizes = np.frombuffer(raw, "<i4", 3, HEADER_BYTES).copy()
    raw[HEADER_BYTES:HEADER_BYTES + 12] = sizes[[1, 0, 2]].astype("<i4").tobytes()  # same sum
    open(idx, "wb").write(bytes(raw))
    with pytest.raises(DatasetFormatError, match=r"d\.idx: bad pointers\[1\].*swapped or corrupt"):
        IndexedDataset(prefix)


def test_a_pointer_that_does_not_match_the_sizes_is_refused(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[1, 2, 3], [4, 5], [6, 7], [8]])
    idx = prefix + ".idx"
    raw = bytearray(open(idx, "rb").read())
    at = HEADER_BYTES + 4 * 4 + 8 * 2  # pointers[2]
    raw[at:at + 8] = struct.pack("<q", 8)  # truth: (3 + 2) * 2 = 10
    open(idx, "wb").write(bytes(raw))
    with pytest.raises(DatasetFormatError, match=r"pointers\[2\]: expected 10"):
        IndexedDataset(prefix)


def test_dtype_code_of_another_width_is_refused_by_the_bin_size(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[1, 2, 3], [4, 5]])
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[17] = 4  # int32 over uint16 data
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(DatasetFormatError, match=r"d\.bin: bad file size"):
        IndexedDataset(prefix)


def test_signed_dtype_over_unsigned_data_is_caught_at_train_start(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[1, 40000, 3], [4, 5]])
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[17] = 3  # int16: same width, so only the values tell
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"d\.bin holds negative token id -25536.*int16"):
        check_data_fits(_cfg(prefix, vocab=50304))


# ---- ids vs vocabulary, tokenizer mismatch, empty data ------------------------------------
def test_token_id_beyond_the_vocabulary_names_file_and_fix(tmp_path):
    prefix = _write(str(tmp_path / "d"), [[1, 2, 3], [4, 9000, 6]])
    with pytest.raises(DataError, match=r"d\.bin holds token id 9000 \(found by a scan of every "
                                        r"token\), but model.vocab_size=8192; set model.vocab_size "
                                        r"to at least 9001"):
        check_data_fits(_cfg(prefix))
    seen = []
    check_data_fits(_cfg(prefix, vocab=9001), log=seen.append)
    assert "ids 1..9000 < vocab 9001" in seen[0]


def test_sampled_scan_beyond_the_full_scan_limit(tmp_path, monkeypatch):
    import megaponder.data.checks as checks

    prefix = _write(str(tmp_path / "d"), [list(range(100))] * 50)
    monkeypatch.setattr(checks, "FULL_SCAN_BYTES", 16)  # force the bounded path on a small file
    lo, hi = checks.token_range(IndexedDataset(prefix))
    assert (lo, hi) == (0, 99)  # the windows cover this small file entirely
    with pytest.raises(DataError, match="sample of 256 windows"):
        check_data_fits(_cfg(prefix, vocab=50))


def test_vocab_smaller_than_the_tokenizer_is_one_clear_error():
    demo = demo_corpus_dir()
    prefix = os.path.join(demo, "train_text_document")
    with pytest.raises(DataError, match=r"model.vocab_size=1000 is smaller than the vocabulary of "
                                        r"data.tokenizer_model .*tokenizer.model \(8192 tokens\); "
                                        r"set model.vocab_size=8192"):
        check_data_fits(_cfg(prefix, vocab=1000, tokenizer=os.path.join(demo, "tokenizer.model")))


def test_data_made_with_another_tokenizer_is_refused(tmp_path):
    demo = demo_corpus_dir()
    sp = os.path.join(demo, "tokenizer.model")
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "In the beginning God created the heaven."}] * 3)
    preprocess(src, ["text"], "SentencePieceTokenizer", sp, str(tmp_path / "c"), **_quiet())
    prefix = str(tmp_path / "c_text_document")
    meta = read_meta(prefix)
    assert meta["tokenizer"]["vocab_size"] == 8192 and meta["max_token_id"] < 8192
    check_data_fits(_cfg(prefix, tokenizer=sp))  # the right tokenizer passes
    with pytest.raises(DataError, match=r"c_text_document\.bin was made with another tokenizer "
                                        r"\(.*tokenizer.model, 8192 tokens, per .*meta.json\)"):
        check_data_fits(_cfg(prefix, vocab=50304, tokenizer=neox_tokenizer_json(),
                             tokenizer_type="HFTokenizer"))


def test_empty_dataset_names_the_file(tmp_path):
    prefix = _write(str(tmp_path / "empty"), [])
    with pytest.raises(DataError, match=r"empty\.bin/\.idx hold no tokens"):
        check_data_fits(_cfg(prefix))
    from megaponder.data import build_train_valid_datasets
    with pytest.raises(DataError, match=r"empty\.idx holds 0 sequence\(s\).*dataset is empty"):
        build_train_valid_datasets(_cfg(prefix).data, 1, 10, 0)


# ---- preprocessing safety -----------------------------------------------------------------
GOOD = [{"text": "In the beginning God created the heaven and the earth."},
        {"text": "And the earth was without form, and void."}]


@pytest.mark.parametrize("workers", [1, 2])
def test_all_bad_records_leave_previous_outputs_untouched(tmp_path, workers):
    tok = neox_tokenizer_json()
    out = str(tmp_path / "out")
    preprocess(write_jsonl(tmp_path / "good.jsonl", GOOD), ["text"], "HFTokenizer", tok, out,
               **_quiet())
    files = [out + "_text_document" + ext for ext in (".bin", ".idx", ".meta.json")]
    before = [open(f, "rb").read() for f in files]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}, b"not json\n", {"text": ""}])
    s = preprocess(bad, ["text"], "HFTokenizer", tok, out, **_quiet(workers=workers))
    assert s["documents"] == {"text": 0} and s["written"] == []
    assert [open(f, "rb").read() for f in files] == before
    assert not os.path.exists(out + ".preprocess-tmp")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crash_leaves_previous_outputs_intact(tmp_path, monkeypatch, workers):
    """A failure while writing (here: the index write raising, as a full disk would) must not
    cost the previous good files — the run writes under a temporary name and renames at the end."""
    import megaponder.data.indexed as indexed

    tok = neox_tokenizer_json()
    out = str(tmp_path / "out")
    preprocess(write_jsonl(tmp_path / "good.jsonl", GOOD), ["text"], "HFTokenizer", tok, out,
               **_quiet())
    files = [out + "_text_document" + ext for ext in (".bin", ".idx", ".meta.json")]
    before = [open(f, "rb").read() for f in files]

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(indexed, "write_index", full_disk)
    with pytest.raises((OSError, RuntimeError), match="No space left"):
        preprocess(write_jsonl(tmp_path / "more.jsonl", GOOD * 3), ["text"], "HFTokenizer", tok,
                   out, **_quiet(workers=workers))
    assert [open(f, "rb").read() for f in files] == before


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HFTokenizer"])
def test_lone_surrogate_record_is_skipped_and_counted(tmp_path, kind):
    model = (os.path.join(demo_corpus_dir(), "tokenizer.model") if kind == "SentencePieceTokenizer"
             else neox_tokenizer_json())
    rows = [GOOD[0], b'{"text": "lone \\ud800 surrogate"}\n', GOOD[1],
            b'{"text": ["fine", "bad \\udfff part"]}\n']
    s = preprocess(write_jsonl(tmp_path / "s.jsonl", rows), ["text"], kind, model,
                   str(tmp_path / "s"), **_quiet())
    assert s["documents"] == {"text": 2}
    assert s["bad_by_reason"] == {"undecodable text": 2}
    assert [b["line"] for b in s["bad_examples"]] == [2, 4]
    ds = IndexedDataset(str(tmp_path / "s_text_document"))
    assert ds.num_documents == 2
    assert json.load(open(meta_path(str(tmp_path / "s_text_document"))))["documents"] == 2


def test_merge_carries_the_sidecar_over_and_a_failed_merge_keeps_the_old_output(tmp_path):
    from conftest_data import run_tool

    tok = neox_tokenizer_json()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    preprocess(write_jsonl(tmp_path / "a.jsonl", GOOD[:1]), ["text"], "HFTokenizer", tok, a, **_quiet())
    preprocess(write_jsonl(tmp_path / "b.jsonl", GOOD[1:]), ["text"], "HFTokenizer", tok, b, **_quiet())
    a, b, out = a + "_text_document", b + "_text_document", str(tmp_path / "ab")
    run_tool("merge_datasets.py", "--inputs", a, b, "--output-prefix", out)
    ma, mb, merged = read_meta(a), read_meta(b), read_meta(out)
    assert merged["max_token_id"] == max(ma["max_token_id"], mb["max_token_id"])
    assert merged["documents"] == 2 and merged["tokens"] == ma["tokens"] + mb["tokens"]
    before = [open(out + ext, "rb").read() for ext in (".bin", ".idx", ".meta.json")]
    proc = run_tool("merge_datasets.py", "--inputs", a, str(tmp_path / "missing"),
                    "--output-prefix", out, check=False)
    assert proc.returncode == 2
    assert [open(out + ext, "rb").read() for ext in (".bin", ".idx", ".meta.json")] == before
    # an input without a sidecar (e.g. made by Megatron): the merged output gets none
    _write(str(tmp_path / "plain"), [[1, 2, 3]])
    run_tool("merge_datasets.py", "--inputs", a, str(tmp_path / "plain"), "--output-prefix", out)
    assert not os.path.exists(meta_path(out))
