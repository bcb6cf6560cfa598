"""The in-training spectral probe (analysis.fprinciple_every) through the real CLI: its keys
in metrics.jsonl, the baseline file, no effect on the training trajectory, and the layout rule."""
import json
import os

import pytest

from conftest_data import demo_corpus_dir
from test_train import train

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "data.seq_length=32",
        "train.micro_batch_size=4", "train.log_every=1", "train.progress_bar=false", "train.steps=4",
        "optim.warmup_steps=2", "train.eval_batches=1", "train.threads=1",
        "analysis.fprinciple_probes=64", "analysis.fprinciple_scan_tokens=50000"]


def _train(run_dir, *extra):
    train(run_dir, demo_corpus_dir(), *extra, tiny=TINY)
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_probe_logs_its_curves_and_leaves_training_unchanged(tmp_path):
    probed = _train(tmp_path / "probed", "analysis.fprinciple_every=2")
    plain = _train(tmp_path / "plain")
    records = [r for r in probed if "fprinciple/seconds" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records:
        for f in (0.05, 0.1, 0.2, 0.5, 1):
            assert 0.0 <= r[f"fprinciple/e_low/d={f:g}"] <= 1.5 and 0.0 <= r[f"fprinciple/e_high/d={f:g}"] <= 1.5
    # training lowers the wide-kernel (low-frequency) error from its step-0 value
    assert records[-1]["fprinciple/e_low/d=1"] < records[0]["fprinciple/e_low/d=1"]
    desc = json.load(open(tmp_path / "probed" / "fprinciple_probe.json"))
    assert set(desc["baselines"]) == {"unigram", "bigram", "step0"}
    assert all(abs(row["e_high"] - 1.0) < 1e-9 for row in desc["baselines"]["unigram"])
    assert desc["num_probes"] == 64 and desc["context"] == 3
    # eval mode, no grad, no global RNG: the same losses with and without the probe
    loss = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    assert loss(probed) == loss(plain)


def test_probe_needs_a_layout_without_model_parallelism():
    from megaponder.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="analysis.fprinciple_every=5 needs parallel.tp=1"):
        load_config(None, ["analysis.fprinciple_every=5", "parallel.tp=2"], check_paths=False)
