"""Property-based fuzzing of the three places that read user input: the config loader, the
.bin/.idx reader and the jsonl preprocessor. Any input gives a result or the documented error
class (ConfigError / DatasetFormatError), never another exception or a hang.

Bounded for CI: derandomized (the same examples every run, so a failure reproduces), no example
database, a fixed number of examples per property and a timeout per test.
"""
import json
import os
import string
import tempfile

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir
from megaponder.config import Config, ConfigError, load_config
from megaponder.config.base import field_docs
from megaponder.data import DatasetFormatError, IndexedDataset, IndexedDatasetBuilder
from megaponder.data.preprocess import preprocess

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TINY_YML = os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")
KEYS = [key for section in ("model", "ponder", "parallel", "data", "optim", "train")
        for key, *_ in field_docs(type(getattr(Config(), section)), section)]

# ---- config loader ------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
key_paths = st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_lowercase + "._", max_size=20))


def _load_ok(path=None, overrides=()):
    try:
        cfg = load_config(path, overrides, check_paths=False)
    except ConfigError as e:
        assert str(e)  # a message, never an empty error
        return None
    assert isinstance(cfg, Config)
    return cfg


@pytest.mark.timeout(120)
@FUZZ
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_config_loader_random_yaml_text(text):
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        _load_ok(f.name)
    finally:
        os.unlink(f.name)


@pytest.mark.timeout(120)
@FUZZ
@given(st.dictionaries(key_paths, values, max_size=6))
# found by this fuzzer once (each was a crash or a hang before it was fixed):
@example({"model.family": "0\x1f"})                                  # control char: ReaderError
@example({"model.make_vocab_size_divisible_by": 0})                   # ZeroDivisionError
@example({"model.hidden_size": 10 ** 15 + 1, "model.num_heads": 7})  # divisor search hang
@example({"train": 5, "train.steps": 3})                              # a value, not a section
@example({"model": {1: 2}})                                           # non-string key
def test_config_loader_random_trees_and_set_overrides(tree):
    # the same assignments once as a YAML document (nested) and once as --set key=value
    nested: dict = {}
    for path, value in tree.items():
        node, parts = nested, path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        node[parts[-1]] = value
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(nested, f)
    try:
        _load_ok(f.name)
    finally:
        os.unlink(f.name)
    _load_ok(TINY_YML, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                        for k, v in tree.items()])
    _load_ok(TINY_YML, [f"{k}={v}" for k, v in tree.items() if isinstance(v, str)])


# ---- .bin/.idx reader -----------------------------------------------------------------------
def _valid_pair(tmp, docs, dtype):
    prefix = os.path.join(tmp, "d")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_item(np.asarray(d, dtype=np.int64))
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def _read_all_or_format_error(prefix):
    try:
        ds = IndexedDataset(prefix)
    except DatasetFormatError as e:
        assert e.path.startswith(prefix)  # the error names the file
        return
    for i in range(len(ds)):  # everything the header promises must be readable
        assert ds[i].size == ds.sizes[i]
    for k in range(ds.num_documents):
        ds.document(k)


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=120), st.binary(max_size=64))
def test_indexed_reader_random_bytes(idx_bytes, bin_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "d")
        # half of the cases start with a valid magic+version so the deeper checks get exercised
        if idx_bytes and idx_bytes[0] % 2:
            idx_bytes = b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + idx_bytes[1:]
        open(prefix + ".idx", "wb").write(idx_bytes)
        open(prefix + ".bin", "wb").write(bin_bytes)
        _read_all_or_format_error(prefix)


@pytest.mark.timeout(120)
@FUZZ
@given(st.lists(st.lists(st.integers(0, 300), max_size=6), min_size=1, max_size=5),
       st.sampled_from([np.uint16, np.int32]),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(-3, 3))
def test_indexed_reader_mutated_valid_files(docs, dtype, flips, bin_delta):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _valid_pair(tmp, docs, dtype)
        raw = bytearray(open(prefix + ".idx", "rb").read())
        for pos, byte in flips:
            raw[pos % len(raw)] = byte
        open(prefix + ".idx", "wb").write(bytes(raw))
        data = open(prefix + ".bin", "rb").read()
        open(prefix + ".bin", "wb").write(data[:max(0, len(data) + bin_delta)] if bin_delta < 0
                                          else data + b"\x07" * bin_delta)
        _read_all_or_format_error(prefix)


# ---- jsonl preprocessor ---------------------------------------------------------------------
texts = st.text(alphabet=st.one_of(st.characters(codec="utf-8"),
                                   st.sampled_from(["\ud800", "\udfff", "\n", "\x00", "\u2028"])),
                max_size=40)
records = st.one_of(
    st.fixed_dictionaries({"text": texts}),
    st.fixed_dictionaries({"text": st.lists(texts, max_size=3)}),
    st.dictionaries(st.text(max_size=5), values, max_size=3),             # missing key / wrong type
    values.filter(lambda v: not isinstance(v, dict)),                     # not an object
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" ")),         # not JSON, not UTF-8
)


@pytest.mark.timeout(180)
@settings(FUZZ, max_examples=40)  # each example runs a whole preprocessing: fewer of them
@given(st.lists(records, min_size=1, max_size=8), st.booleans())
def test_preprocessor_random_records(rows, append_eod):
    tok = os.path.join(demo_corpus_dir(), "tokenizer.model")  # SentencePiece: TypeError on surrogates
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.jsonl")
        with open(src, "wb") as f:
            for r in rows:
                f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
        s = preprocess(src, ["text"], "SentencePieceTokenizer", tok, os.path.join(tmp, "out"),
                       append_eod=append_eod, workers=1, progress=False,
                       out=open(os.devnull, "w"), err=open(os.devnull, "w"))
        # every line is either one document or one counted bad record
        assert s["lines"] == len(rows) and s["documents"]["text"] + s["bad_records"] == len(rows)
        if s["documents"]["text"]:
            ds = IndexedDataset(s["outputs"]["text"])
            assert ds.num_documents == s["documents"]["text"]
            assert ds.num_tokens == s["tokens"]["text"]
        else:
            assert not os.path.exists(s["outputs"]["text"] + ".bin")  # no empty outputs
