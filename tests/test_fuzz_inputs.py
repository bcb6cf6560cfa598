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


# ---- YAML with anchors, aliases and tags -----------------------------------------------------
TAGS = ["", "", "", "!!str ", "!!int ", "!!float ", "!!binary ", "!!set ", "!!omap ", "!!timestamp ",
        "!!python/object/apply:os.system ", "!!python/name:os.system ", "!function a_evil.run ",
        "!custom "]
SCALAR_TEXT = ["1", "0.5", "x", "true", "null", "'a b'", "2026-12-06", "aGVsbG8=", "1e30", "-7"]


@st.composite
def yaml_with_aliases(draw):
    """A YAML document of anchored flow collections whose items are scalars (optionally
    tagged) or aliases of earlier anchors, used by a config key (plain alias, merge key or
    tagged value); the anchors sit at the top level (an unknown key) or inside the key's own
    value (what the loader then coerces). Fan-out up to 12 over up to 9 levels covers the
    alias bomb and its smaller cousins."""
    defs, anchors = [], []
    for i in range(draw(st.integers(0, 9))):
        items = []
        for _ in range(draw(st.integers(0, 12))):
            if anchors and draw(st.booleans()):
                items.append(f"*{draw(st.sampled_from(anchors))}")
            else:
                items.append(draw(st.sampled_from(TAGS)) + draw(st.sampled_from(SCALAR_TEXT)))
        if draw(st.booleans()):
            body = "[" + ", ".join(items) + "]"
        else:
            body = "{" + ", ".join(f"k{j}: {v}" for j, v in enumerate(items)) + "}"
        defs.append(f"{draw(st.sampled_from(TAGS[:4]))}&a{i} {body}")
        anchors.append(f"a{i}")
    section = draw(st.sampled_from(["model", "train", "data", "ponder"]))
    key = draw(st.sampled_from(KEYS)).split(".")[-1]
    use = draw(st.sampled_from(TAGS)) + (f"*{draw(st.sampled_from(anchors))}" if anchors else "1")
    if draw(st.booleans()):  # anchors inside the value: [def, def, ..., use]
        text = f"{section}:\n  {key}: [" + ", ".join(defs + [use]) + "]\n"
    else:
        text = "".join(f"d{i}: {d}\n" for i, d in enumerate(defs)) + draw(st.sampled_from(
            [f"{section}:\n  {key}: {use}\n", f"{section}:\n  <<: {use}\n", f"{section}: {use}\n"]))
    if draw(st.booleans()) and anchors:  # a self-reference
        text += "loop: &self [1, *self]\n"
    return text


@pytest.mark.timeout(180)
@settings(FUZZ, max_examples=80, deadline=5000)  # a bomb must fail fast: 5 s per example at most
@given(yaml_with_aliases())
@example("train:\n  steps: [&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], "
         + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)) + "]\n")  # 9^9
@example("model:\n  family: !!timestamp 1\n")  # found by this fuzzer: AttributeError inside PyYAML
def test_config_loader_yaml_aliases_and_tags(text):
    marker = os.path.join(tempfile.gettempdir(), "megaponder-fuzz-marker")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False, encoding="utf-8") as f:
        f.write(text.replace("a_evil.run", f"os.system('touch {marker}')"))
    try:
        try:
            load_config(f.name, check_paths=False)
        except ConfigError as e:
            assert str(e) and "\n" not in str(e) and len(str(e)) < 1000  # one short line
    finally:
        os.unlink(f.name)
    assert not os.path.exists(marker)


# ---- index caches ---------------------------------------------------------------------------
def _cache_dataset(cache_dir):
    from megaponder.data.gpt_dataset import GPTDataset

    ds = IndexedDataset(os.path.join(demo_corpus_dir(), "validation_text_document"))
    return GPTDataset(ds, np.arange(len(ds), dtype=np.int32), 30, 16, 3, cache_dir=cache_dir)


arrays = st.builds(lambda dtype, shape, seed: np.random.RandomState(seed).randint(-5, 5000, size=shape).astype(dtype),
                   st.sampled_from([np.int32, np.int64, np.uint32, np.uint16, np.float64, np.bool_]),
                   st.sampled_from([(0,), (3,), (31,), (31, 2), (32, 2), (40,), (2, 31), (5, 3)]),
                   st.integers(0, 2 ** 31))


@pytest.mark.timeout(180)
@settings(FUZZ, max_examples=40)
@given(st.sampled_from(["doc_idx", "sample_idx", "shuffle_idx", "description"]),
       st.one_of(arrays, st.binary(max_size=200),
                 st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6)))
def test_index_cache_random_contents(part, damage):
    """Whatever a cache file holds (random arrays of any dtype/shape, random bytes, byte
    flips of the valid file), the dataset comes up and every sample has seq_length + 1 tokens
    from the data: a bad entry is rebuilt, never trusted, never unpickled."""
    with tempfile.TemporaryDirectory() as cache:
        clean = _cache_dataset(cache)
        want = [clean.sample_tokens(i)[0] for i in range(len(clean))]
        path = clean.cache_paths[part]
        del clean
        if isinstance(damage, np.ndarray):
            np.save(path, damage) if part != "description" else open(path, "w").write(json.dumps(damage.tolist()))
        elif isinstance(damage, bytes):
            open(path, "wb").write(damage)
        else:
            raw = bytearray(open(path, "rb").read())
            for pos, byte in damage:
                raw[pos % len(raw)] = byte
            open(path, "wb").write(bytes(raw))
        again = _cache_dataset(cache)
        got = [again.sample_tokens(i)[0] for i in range(len(again))]
        assert len(got) == len(want) and all(g.shape == (17,) for g in got)
        if part == "description" or not isinstance(damage, list):
            assert all(np.array_equal(g, w) for g, w in zip(got, want))  # rebuilt exactly


# ---- checkpoint folders with links ----------------------------------------------------------
LINKABLE = ["checkpoints", "checkpoints/global_step2", "checkpoints/latest", "checkpoints/global_step2/model.pt",
            "checkpoints/global_step2/meta.json", "checkpoints/global_step2/config.yml", ".lock",
            "checkpoints/.tmp-global_step2", "checkpoints/.old-global_step2"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run dir with one checkpoint in the saved format (fresh weights: only files matter)."""
    from megaponder.config import Config, ModelConfig
    from megaponder.models import build_model
    from megaponder.train.checkpoint import write_model_files

    run = tmp_path_factory.mktemp("saved") / "run"
    tag = run / "checkpoints" / "global_step2"
    cfg = Config(model=ModelConfig(family="vanilla", vocab_size=8192, hidden_size=16, num_layers=1,
                                   num_heads=2, max_position_embeddings=32))
    write_model_files(str(tag), cfg, build_model(cfg).state_dict(), {"step": 2, "family": "vanilla"})
    (run / "checkpoints" / "latest").write_text("global_step2\n")
    return str(run)


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=25)
@given(st.sets(st.sampled_from(LINKABLE), min_size=1, max_size=3), st.booleans())
def test_checkpoint_folders_with_links(saved_run, linked, dangling):
    """Any of the run's own names replaced by a link (to a copy outside, or dangling): taking
    the run dir (claim_run_dir) and loading from it give a result or the one-line
    CheckpointError/UnsafePath; nothing outside the run changes."""
    import shutil

    from megaponder.safe_files import UnsafePath
    from megaponder.train import checkpoint as ckpt
    from megaponder.train.runlock import claim_run_dir

    with tempfile.TemporaryDirectory() as tmp:
        run, outside = os.path.join(tmp, "run"), os.path.join(tmp, "outside")
        shutil.copytree(saved_run, run)
        os.makedirs(outside)
        for i, rel in enumerate(sorted(linked, key=len)):
            path = os.path.join(run, rel)
            if not os.path.lexists(os.path.dirname(path)) or os.path.islink(os.path.dirname(path)):
                continue  # its folder is already a link: nothing more to plant below it
            target = os.path.join(outside, f"t{i}")
            if os.path.lexists(path):
                shutil.move(path, target)
            elif rel.startswith("checkpoints/.") or rel == ".lock":
                os.makedirs(target) if rel != ".lock" else open(target, "w").write("precious\n")
            if dangling and os.path.exists(target):
                shutil.rmtree(target) if os.path.isdir(target) else os.unlink(target)
            os.symlink(target, path)
        before = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
                  for d, _, fs in os.walk(outside) for f in fs}
        root = os.path.join(run, "checkpoints")
        for call in (lambda: claim_run_dir(run, root, "auto", False)[0].release(),
                     lambda: ckpt.load_model(run),
                     lambda: [ckpt.verify_checkpoint(f) for f in ckpt.resume_candidates(root)]):
            try:
                call()
            except (ckpt.CheckpointError, UnsafePath, FileNotFoundError) as e:
                assert "\n" not in str(e)
        after = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
                 for d, _, fs in os.walk(outside) for f in fs}
        assert after == before
