"""Tokenizer files as users bring them: a LLaMA-3-style tokenizer.json (end of document
<|end_of_text|>), a GPT-2 vocab.json + merges.txt pair, a tokenizer folder, a config naming
the wrong kind, an explicit --eod-token / data.eod_token — preprocessed with the real tool and
trained on with the tiny LLaMA config."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest_data import REPO_ROOT, demo_corpus_dir, run_tool

from megaponder.data import IndexedDataset
from megaponder.data.tokenizer import EOD_CANDIDATES, build_tokenizer, copy_tokenizer

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]


def _train_bpe(folder, specials, vocab_size=400):
    """A byte-level BPE trained offline on the demo corpus, with ``specials`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in open(os.path.join(demo_corpus_dir(), "validation.jsonl"))]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    return tk


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-tok")
    tk = _train_bpe(str(folder), LLAMA_SPECIALS)
    return str(folder / "tokenizer.json"), tk.token_to_id("<|end_of_text|>")


def test_llama3_tokenizer_preprocesses_with_append_eod_and_the_tiny_llama_config_trains(tmp_path, llama_tok):
    path, eot = llama_tok
    demo = demo_corpus_dir()
    rows = [json.loads(line) for line in open(os.path.join(demo, "validation.jsonl"))]
    p = run_tool("preprocess_data.py", "--input", os.path.join(demo, "validation.jsonl"),
                 "--tokenizer-type", "HFTokenizer", "--tokenizer-model", path,
                 "--output-prefix", tmp_path / "llama", "--append-eod", "--workers", "2")
    assert f"{len(rows)} documents" in p.stdout
    ds = IndexedDataset(str(tmp_path / "llama_text_document"))
    ends = ds.pointers // ds.dtype.itemsize + ds.sizes - 1   # last token of every sequence
    tokens = ds.all_tokens()
    assert ds.num_documents == len(rows) and (tokens[ends] == eot).all()
    assert np.count_nonzero(tokens == eot) == len(rows)       # and nowhere else
    meta = json.load(open(tmp_path / "llama_text_document.meta.json"))
    assert meta["tokenizer"]["eod_token"] == "<|end_of_text|>" and meta["tokenizer"]["eod"] == eot
    # the tiny LLaMA config as shipped says SentencePieceTokenizer: one note, then it trains
    run_dir = tmp_path / "run"
    sets = [f"train.run_dir={run_dir}", f"data.path=[{tmp_path}/llama_text_document]",
            f"data.valid_path=[{tmp_path}/llama_text_document]", f"data.tokenizer_model={path}",
            "train.steps=3", "train.micro_batch_size=2", "data.seq_length=32",
            "model.hidden_size=32", "model.intermediate_size=64", "train.eval_batches=1",
            "train.threads=1", "train.progress_bar=false", "train.log_every=1",
            "data.reset_position_ids=true", "train.save_every=3"]
    cmd = [sys.executable, "-m", "megaponder", "train", "--config",
           os.path.join(REPO_ROOT, "examples", "configs", "tiny-llama-vanilla.yml")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [l for l in proc.stderr.splitlines() if "tokenizer type SentencePieceTokenizer was given" in l]
    assert len(notes) == 1 and "is a HFTokenizer file; reading it as HFTokenizer" in notes[0]
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert {r["step"] for r in rows} == {1, 2, 3} and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    # the checkpoint carries the tokenizer: generate stops at <|end_of_text|>
    ckpt_tok = build_tokenizer(None, str(run_dir / "checkpoints" / "global_step3" / "tokenizer.json"))
    assert ckpt_tok.eod == eot


def test_no_known_end_of_document_lists_what_was_tried_and_eod_token_picks_one(tmp_path):
    folder = tmp_path / "tok"
    _train_bpe(str(folder), ["<s>", "<|doc_end|>"])
    path = str(folder / "tokenizer.json")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "In the beginning"}\n{"text": "God created"}\n')
    bad = run_tool("preprocess_data.py", "--input", src, "--tokenizer-model", path,
                   "--output-prefix", tmp_path / "x", "--append-eod", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    tried = ", ".join(repr(c) for c in EOD_CANDIDATES)
    assert bad.stderr.strip() == (f"megaponder: {path}: no end-of-document token found (tried "
                                  f"{tried}); set data.eod_token (or --eod-token) to the token "
                                  f"that ends a document.")
    ok = run_tool("preprocess_data.py", "--input", src, "--tokenizer-model", path,
                  "--output-prefix", tmp_path / "x", "--append-eod", "--eod-token", "<|doc_end|>")
    ds = IndexedDataset(str(tmp_path / "x_text_document"))
    doc_end = build_tokenizer(None, path, "<|doc_end|>").eod
    assert [int(ds[i][-1]) for i in range(2)] == [doc_end, doc_end] and doc_end == 1, ok.stdout
    # training reads the token the data was made with from its .meta.json (no data.eod_token)
    from megaponder.config import config_from_dict
    from megaponder.data.checks import data_tokenizer
    cfg = config_from_dict({"data": {"path": [str(tmp_path / "x_text_document")],
                                     "tokenizer_model": path}}, check_paths=False)
    assert data_tokenizer(cfg.data).eod == doc_end
    cfg.data.eod_token = "<s>"  # an explicit key wins
    assert data_tokenizer(cfg.data).eod == 0


def test_gpt2_pair_and_folders_read_like_the_tokenizer_json(tmp_path, llama_tok):
    path, eot = llama_tok
    reference = build_tokenizer("HFTokenizer", path)
    pair = tmp_path / "gpt2"
    pair.mkdir()
    from tokenizers import Tokenizer
    Tokenizer.from_file(path).model.save(str(pair))          # vocab.json + merges.txt
    assert sorted(os.listdir(pair)) == ["merges.txt", "vocab.json"]
    text = "In the beginning God created the heaven and the earth.\n  Tabs\tand ünïcode"
    for where in (str(pair / "vocab.json"), str(pair), os.path.dirname(path)):
        tok = build_tokenizer(None, where)
        assert tok.encode(text) == reference.encode(text) and tok.decode(tok.encode(text)) == text
        assert tok.eod == eot and tok.fingerprint == reference.fingerprint
    # a checkpoint gets one self-contained tokenizer.json from a pair
    dest = tmp_path / "ckpt"
    dest.mkdir()
    assert copy_tokenizer(str(pair), str(dest)) == "tokenizer.json"
    assert build_tokenizer(None, str(dest / "tokenizer.json")).encode(text) == reference.encode(text)
    os.remove(pair / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"is a GPT-2 style vocabulary, but .*merges.txt"):
        build_tokenizer(None, str(pair / "vocab.json"))


def test_sentencepiece_named_hf_and_a_corrupt_model_are_one_line(tmp_path):
    demo = demo_corpus_dir()
    tok = build_tokenizer("HFTokenizer", os.path.join(demo, "tokenizer.model"))  # the file wins
    assert type(tok).__name__ == "SentencePieceTokenizer" and tok.token_name(tok.eod) == "<|endoftext|>"
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff garbage")
    p = run_tool("preprocess_data.py", "--input", os.path.join(demo, "validation.jsonl"),
                 "--tokenizer-model", bad, "--output-prefix", tmp_path / "y", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith(f"megaponder: {bad} is not a readable SentencePiece model (")
