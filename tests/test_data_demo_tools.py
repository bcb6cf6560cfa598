"""The demo corpus end to end, and the merge / inspect / index-cache tools on it."""
import json
import os

import numpy as np

from conftest_data import demo_corpus_dir, megatron_indexed, run_tool
from megaponder.config import DataConfig
from megaponder.data import IndexedDataset, build_tokenizer, build_train_valid_datasets


def test_demo_corpus_contents_and_reuse():
    d = demo_corpus_dir()
    stats = json.load(open(os.path.join(d, "stats.json")))
    assert stats["train"]["documents"] + stats["validation"]["documents"] == 1189   # KJV chapters
    assert stats["validation"]["documents"] == 59
    assert 100 < stats["unigram_valid_ppl"] < 2000
    tok = build_tokenizer("SentencePieceTokenizer", os.path.join(d, "tokenizer.model"))
    assert tok.vocab_size == 8192 and tok.decode([tok.eod]) == "<|endoftext|>"
    train = IndexedDataset(os.path.join(d, "train_text_document"))
    first = tok.decode(train[0][:-1])
    assert first.startswith("In the beginning God created the heaven and the earth.")
    assert not any(ch.isdigit() for ch in first[:200])            # verse numbers stripped
    assert all(train[i][-1] == tok.eod for i in range(len(train)))
    theirs = megatron_indexed().IndexedDataset(os.path.join(d, "validation_text_document"))
    np.testing.assert_array_equal(theirs.document_indices,
                                  IndexedDataset(os.path.join(d, "validation_text_document")).doc_idx)
    again = run_tool("prepare_demo_corpus.py", "--output-dir", d)
    assert "reused jsonl, tokenizer, train, validation, stats" in again.stdout


def test_reset_flags_give_positions_and_segments(tmp_path):
    d = demo_corpus_dir()
    cfg = DataConfig(path=[os.path.join(d, "train_text_document")],
                     valid_path=[os.path.join(d, "validation_text_document")], seq_length=256,
                     tokenizer_model=os.path.join(d, "tokenizer.model"), reset_position_ids=True,
                     reset_attention_mask=True, index_cache_dir=str(tmp_path))
    train, valid = build_train_valid_datasets(cfg, 1234, 64, 16)
    eod = build_tokenizer("SentencePieceTokenizer", cfg.tokenizer_model).eod
    for i in range(len(train)):
        item = train[i]
        t = item["tokens"]
        if (t[:-1] == eod).any():
            k = int(np.flatnonzero(t[:-1] == eod)[0])
            assert item["position_ids"][k + 1] == 0 and item["segment_ids"][k + 1] == 1
            break
    else:
        raise AssertionError("no sample crosses a document boundary")
    assert len(valid) >= 16 and valid[0]["tokens"].shape == (257,)


def test_merge_tool(tmp_path):
    d = demo_corpus_dir()
    tr, va = os.path.join(d, "train_text_document"), os.path.join(d, "validation_text_document")
    out = run_tool("merge_datasets.py", "--inputs", tr, va, "--output-prefix", tmp_path / "all")
    assert "1189 documents" in out.stdout
    merged = IndexedDataset(str(tmp_path / "all"))
    np.testing.assert_array_equal(merged[1130], IndexedDataset(va)[0])
    bad = run_tool("merge_datasets.py", "--inputs", tr, str(tmp_path / "nope"), "--output-prefix",
                   tmp_path / "x", check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_inspect_shows_what_training_sees(tmp_path):
    d = demo_corpus_dir()
    prefix, model = os.path.join(d, "train_text_document"), os.path.join(d, "tokenizer.model")
    common = ["--data", prefix, "--tokenizer-model", model, "--micro-batch-size", "2",
              "--dp-size", "2", "--seq-length", "32", "--train-steps", "10",
              "--index-cache-dir", tmp_path, "--json"]
    out = run_tool("inspect_dataset.py", *common, "--step", "3", "--rank", "1")
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    cfg = DataConfig(path=[prefix], seq_length=32, index_cache_dir=str(tmp_path))
    train, _ = build_train_valid_datasets(cfg, 1234, 10 * 4, 0)
    from megaponder.data import build_data_iterator
    it = build_data_iterator(train, 2, 1, 2, consumed_samples=3 * 4)
    assert [r["tokens"] for r in rows] == next(it)["tokens"].tolist()
    raw = run_tool("inspect_dataset.py", "--data", prefix, "--tokenizer-model", model, "--index", "0")
    assert "In the beginning" in raw.stdout


def test_build_index_cache_tool(tmp_path):
    d = demo_corpus_dir()
    cfg = tmp_path / "run.yml"
    cfg.write_text(
        "data:\n"
        f"  path: [{os.path.join(d, 'train_text_document')}]\n"
        f"  valid_path: [{os.path.join(d, 'validation_text_document')}]\n"
        f"  tokenizer_model: {os.path.join(d, 'tokenizer.model')}\n"
        f"  index_cache_dir: {tmp_path / 'cache'}\n"
        "  seq_length: 64\n"
        "train:\n  steps: 20\n  micro_batch_size: 4\n  eval_every: 10\n  eval_batches: 2\n")
    out = run_tool("build_index_cache.py", "--config", cfg, "--dp-size", "2")
    assert "160 train / 48 valid samples" in out.stdout
    assert len(list((tmp_path / "cache").glob("*-description.json"))) == 2
    assert "sample index" not in out.stderr  # stderr is not a terminal: no bar by default
    again = run_tool("build_index_cache.py", "--config", cfg, "--dp-size", "2", "--progress")
    assert "sample index: 100%" in again.stderr and "2/2" in again.stderr, again.stderr
    assert again.stdout.splitlines()[:2] == out.stdout.splitlines()[:2]  # the cache, loaded
