"""MFU, tokens/s and peak memory in the training log (megaponder/train/throughput.py)."""
import json
import os

import torch

from megaponder.config import load_config
from megaponder.models import build_model, flops
from megaponder.train.throughput import ThroughputMeter, peak_memory_mb
from test_train import demo_data, train  # noqa: F401  (the session's demo corpus fixture)


def test_meter_mfu_is_model_flops_over_peak():
    cfg = load_config(None, ["model.family=adaponderlm", "train.peak_tflops=2.5", "data.seq_length=64"],
                      check_paths=False)
    meter = ThroughputMeter(cfg, world_size=2, device=torch.device("cpu"))
    per_token = flops.training_flops_per_token(build_model(cfg), 64)
    assert meter.flops_per_token == per_token
    assert abs(meter.mfu(1000.0) - per_token * 1000.0 / (2 * 2.5e12)) < 1e-15
    rec = meter.record(4096)
    assert rec["mem_kind"] == "cpu_rss" and rec["mem_peak_mb"] == rec["mem_peak_mb_per_rank"][0] > 10
    assert abs(rec["mfu"] - meter.mfu(rec["step_tokens_per_s"])) <= 1e-5   # rounded to 5 digits
    assert peak_memory_mb(torch.device("cpu"))[0] >= rec["mem_peak_mb"] - 1


def test_training_log_has_mfu_and_memory(tmp_path, demo_data):  # noqa: F811
    run = tmp_path / "run"
    train(run, demo_data, "train.steps=3", "train.peak_tflops=0.05")
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    cfg = load_config(os.path.join(run, "config.yml"), check_paths=False)
    per_token = flops.training_flops_per_token(cfg=cfg.model, ponder=cfg.ponder, seq_len=cfg.data.seq_length)
    for r in steps:
        assert r["mem_kind"] == "cpu_rss" and r["mem_peak_mb"] > 10 and r["step_tokens_per_s"] > 0
        assert abs(r["mfu"] - per_token * r["step_tokens_per_s"] / 0.05e12) <= 1e-5 + 1e-3 * r["mfu"]
