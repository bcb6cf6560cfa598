"""tools/preprocess_data.py: outputs, bad-record handling, worker invariance, tokenizers."""
import gzip
import json
import os

import numpy as np
import pytest

from conftest_data import demo_corpus_dir, megatron_indexed, neox_tokenizer_json, run_tool, write_jsonl
from megaponder.data import IndexedDataset, build_tokenizer
from megaponder.data.preprocess import preprocess

MALFORMED = [
    {"text": "In the beginning God created the heaven and the earth."},   # 1 good
    b'{"text": "And the earth was without form\n',                         # 2 broken JSON
    {"body": "wrong key"},                                                  # 3 missing key
    b'{"text": "caf\xe9 au lait"}\n',                                       # 4 not UTF-8
    {"text": ""},                                                           # 5 empty text
    {"text": "And God said, Let there be light: and there was light."},     # 6 good
    b"[1, 2, 3]\n",                                                         # 7 not an object
    b"\n",                                                                  # 8 blank line
    {"text": 5},                                                            # 9 not a string
    {"text": "And God saw the light, that it was good."},                  # 10 good
]


def _quiet(**kw):
    return dict(progress=False, out=open(os.devnull, "w"), err=open(os.devnull, "w"), **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_records_counted_with_line_numbers(tmp_path, workers):
    tok = neox_tokenizer_json()
    src = write_jsonl(tmp_path / "bad.jsonl", MALFORMED)
    s = preprocess(src, ["text"], "HFTokenizer", tok, str(tmp_path / "out"), append_eod=True,
                   **_quiet(workers=workers))
    assert s["documents"] == {"text": 3} and s["lines"] == 10
    assert s["bad_by_reason"] == {"blank line": 1, "empty text": 1, "invalid JSON": 1,
                                  "missing key": 1, "not a JSON object": 1, "not a string": 1,
                                  "undecodable bytes": 1}
    lines = {b["line"]: b["reason"].split(":")[0] for b in s["bad_examples"]}
    assert lines == {2: "invalid JSON", 3: "missing key", 4: "undecodable bytes", 5: "empty text",
                     7: "not a JSON object", 8: "blank line", 9: "not a string"}
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    t = build_tokenizer("HFTokenizer", tok)
    texts = [MALFORMED[i]["text"] for i in (0, 5, 9)]
    assert [t.decode(ds[i][:-1]) for i in range(3)] == texts   # good records around bad ones kept
    assert all(ds[i][-1] == t.eod == 0 for i in range(3))


def test_workers_do_not_change_a_byte(tmp_path):
    demo = demo_corpus_dir()
    rows = [json.loads(l) for l in open(os.path.join(demo, "validation.jsonl"))]
    mixed = rows[:20] + [b"{oops\n"] + rows[20:40] + [{"text": ""}] + rows[40:]
    src = write_jsonl(tmp_path / "in.jsonl", mixed)
    model = os.path.join(demo, "tokenizer.model")
    outs = {}
    for w in (1, 2, 3):
        prefix = str(tmp_path / f"w{w}")
        outs[w] = preprocess(src, ["text"], "SentencePieceTokenizer", model, prefix,
                             append_eod=True, **_quiet(workers=w))
    for ext in (".bin", ".idx"):
        ref = open(str(tmp_path / "w1_text_document") + ext, "rb").read()
        for w in (2, 3):
            assert open(str(tmp_path / f"w{w}_text_document") + ext, "rb").read() == ref
    for w in (2, 3):
        assert outs[w]["bad_examples"] == outs[1]["bad_examples"]
    assert [b["line"] for b in outs[1]["bad_examples"]] == [21, 42]
    assert outs[1]["documents"]["text"] == len(rows)


def test_gpt_neox_tokenizer_and_megatron_reads_it(tmp_path):
    tok = neox_tokenizer_json()
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hello world! The quick brown fox"},
                                              {"text": "jumps over the lazy dog."}])
    s = preprocess(src, ["text"], "HFTokenizer", tok, str(tmp_path / "neox"), append_eod=True,
                   **_quiet())
    assert s["dtype"] == "uint16" and s["vocab_size"] == 50280
    ds = IndexedDataset(str(tmp_path / "neox_text_document"))
    assert ds[0][:6].tolist() == [12092, 1533, 2, 380, 3158, 8516]   # GPT-NeoX-20B ids
    assert ds[0][-1] == 0                                            # <|endoftext|>
    theirs = megatron_indexed().IndexedDataset(str(tmp_path / "neox_text_document"))
    np.testing.assert_array_equal(theirs[1], ds[1])


def test_gzip_input_and_multiple_keys(tmp_path):
    tok = neox_tokenizer_json()
    rows = [{"text": f"document {i}", "title": f"title {i}"} for i in range(30)]
    rows[4].pop("title")
    gz = tmp_path / "in.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for w in (1, 2):
        s = preprocess(str(gz), ["text", "title"], "HFTokenizer", tok, str(tmp_path / f"k{w}"),
                       **_quiet(workers=w))
        assert s["documents"] == {"text": 30, "title": 29}
        assert s["bad_examples"] == [{"line": 5, "key": "title",
                                      "reason": s["bad_examples"][0]["reason"]}]
    assert open(tmp_path / "k1_title_document.bin", "rb").read() == \
        open(tmp_path / "k2_title_document.bin", "rb").read()


def test_cli_neox_spelling_summary_and_progress(tmp_path):
    tok = neox_tokenizer_json()
    src = write_jsonl(tmp_path / "in.jsonl", MALFORMED)
    p = run_tool("preprocess_data.py", "--input", src, "--jsonl-keys", "text",
                 "--tokenizer-type", "HFTokenizer", "--tokenizer-model", tok,
                 "--output-prefix", tmp_path / "cli", "--append-eod", "--workers", "2", "--progress")
    assert "3 documents" in p.stdout and "bad records skipped: 7" in p.stdout
    assert "line 2: invalid JSON" in p.stderr and "doc/s" in p.stderr
    # not a terminal and no --progress: no bar (no \r redraws in a batch log)
    quiet = run_tool("preprocess_data.py", "--input", src, "--tokenizer-model", tok,
                     "--output-prefix", tmp_path / "cli")
    assert "doc/s" not in quiet.stderr and "\r" not in quiet.stderr and "3 documents" in quiet.stdout
    assert (tmp_path / "cli_text_document.idx").exists()
    bad = run_tool("preprocess_data.py", "--input", src, "--tokenizer-type", "HFTokenizer",
                   "--tokenizer-model", tok, "--output-prefix", tmp_path / "x",
                   "--dataset-impl", "lazy", check=False)
    assert bad.returncode != 0 and "only 'mmap'" in bad.stderr
    missing = run_tool("preprocess_data.py", "--input", tmp_path / "nope.jsonl", "--tokenizer-type",
                       "HFTokenizer", "--tokenizer-model", tok, "--output-prefix", tmp_path / "y",
                       check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_zstd_input_equals_plain_jsonl(tmp_path):
    """The Pile ships as .jsonl.zst: the compressed file gives byte-identical output."""
    zstandard = pytest.importorskip("zstandard")
    tok = neox_tokenizer_json()
    rows = [{"text": f"In the beginning {i} was the word."} for i in range(40)]
    plain = tmp_path / "in.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed = tmp_path / "in.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for name, src in (("plain", plain), ("zst", packed)):
        preprocess(str(src), ["text"], "HFTokenizer", tok, str(tmp_path / name), **_quiet(workers=2))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"plain_text_document{ext}").read_bytes() == \
            (tmp_path / f"zst_text_document{ext}").read_bytes()
