"""tools/train_tokenizer.py: SentencePiece and byte-level BPE from jsonl, usable by preprocessing."""
import json
import os

import pytest

from conftest_data import demo_corpus_dir, run_tool
from megaponder.data import IndexedDataset, build_tokenizer
from megaponder.data.checks import read_meta
from megaponder.data.preprocess import preprocess

TEXT = "In the beginning\nGod created\tthe heaven — 漢字 ☃."


@pytest.mark.parametrize("kind, ext, tok_type, eod", [
    ("sentencepiece", "model", "SentencePieceTokenizer", 3),
    ("hf-bpe", "json", "HFTokenizer", 0),
])
def test_train_tokenizer_then_preprocess(tmp_path, kind, ext, tok_type, eod):
    corpus = os.path.join(demo_corpus_dir(), "validation.jsonl")
    with open(corpus, "rb") as f:
        rows = f.read()
    src = tmp_path / "c.jsonl"
    src.write_bytes(rows + b'{"text": "lone \\ud800"}\n' + b"not json\n")
    out = tmp_path / f"tok.{ext}"
    proc = run_tool("train_tokenizer.py", "--input", src, "--kind", kind, "--vocab-size", 500,
                    "--output", out)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["vocab_size"] == 500 and summary["eod"] == eod
    assert summary["bad_by_reason"] == {"undecodable text": 1, "invalid JSON": 1}
    tok = build_tokenizer(tok_type, str(out))
    ids = tok.encode(TEXT)
    if kind == "hf-bpe":
        assert tok.decode(ids) == TEXT and tok.pad == 1  # byte-level: exact, GPT-NeoX ids
    else:
        # newline kept as a symbol; the normaliser maps the tab to a space; unseen characters
        # come back through byte fallback instead of <unk>
        assert tok.decode(ids) == TEXT.replace("\t", " ")
        assert tok.sp.unk_id() not in ids
    s = preprocess(str(src), ["text"], tok_type, str(out), str(tmp_path / "d"), append_eod=True,
                   progress=False, out=open(os.devnull, "w"), err=open(os.devnull, "w"))
    ds = IndexedDataset(s["outputs"]["text"])
    assert int(ds.all_tokens().max()) < 500 and ds.document(0)[-1] == eod
    assert read_meta(s["outputs"]["text"])["tokenizer"]["fingerprint"] == tok.fingerprint


def test_sentencepiece_newlines_space_mode_and_bad_vocab(tmp_path):
    corpus = os.path.join(demo_corpus_dir(), "validation.jsonl")
    out = tmp_path / "tok.model"
    run_tool("train_tokenizer.py", "--input", corpus, "--kind", "sentencepiece", "--vocab-size",
             400, "--newlines", "space", "--output", out)
    tok = build_tokenizer("SentencePieceTokenizer", str(out))
    assert tok.decode(tok.encode("a\nb")) == "a b"
    proc = run_tool("train_tokenizer.py", "--input", corpus, "--kind", "sentencepiece",
                    "--vocab-size", 10 ** 7, "--output", tmp_path / "x.model", check=False)
    assert proc.returncode == 2 and "SentencePiece training failed" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "x.model")
