"""MFU, tokens/s and peak memory in the training log (megaponder/train/throughput.py)."""
import json
import os

import pytest
import torch

from megaponder.config import load_config
from megaponder.models import build_model, flops
from megaponder.train.throughput import ThroughputMeter, peak_memory_mb
from test_train import train


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


def test_training_log_has_mfu_and_memory(tmp_path, demo_data):
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


def test_profile_steps_write_a_chrome_trace_with_memory(tmp_path, demo_data):
    """train.profile_steps: [2, 3] records exactly those steps (ProfilerStep#2, #3) with
    tensor memory events, as a Chrome trace under run_dir/profile/; training is unchanged."""
    run = tmp_path / "run"
    train(run, demo_data, "train.steps=4", "train.profile_steps=[2,3]")
    traces = sorted((run / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list((run / "profile").iterdir())
    events = json.load(open(traces[0]))["traceEvents"]
    steps = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"], steps
    assert any(e.get("name") == "[memory]" for e in events)   # profile_memory=True
    assert any("aten::mm" in str(e.get("name")) or "aten::addmm" in str(e.get("name")) for e in events)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_peak_tflops_from_the_device_name():
    """MFU needs no setting on a GPU: the datasheet peak of the card the run sees (dense, bf16
    or TF32 for fp32); train.peak_tflops overrides; nothing on CPU. Not verified on a GPU."""
    from megaponder.train.accelerators import device_peak_tflops, find_accelerator
    cases = {"NVIDIA H100 80GB HBM3": ("H100 SXM", 989.4), "NVIDIA H100 PCIe": ("H100 PCIe", 756.5),
             "NVIDIA H100 NVL": ("H100 NVL", 835.5), "NVIDIA H200": ("H200", 989.4),
             "NVIDIA A100-SXM4-80GB": ("A100", 312.0), "NVIDIA A100-PCIE-40GB": ("A100 40GB", 312.0),
             "NVIDIA L40S": ("L40S", 362.05), "AMD Instinct MI300X": ("MI300X", 1307.4)}
    for device_name, (name, bf16) in cases.items():
        acc = find_accelerator(device_name)
        assert (acc.name, acc.peak_tflops("bf16")) == (name, bf16), device_name
        # TF32 is half of bf16 on every datasheet here but L40S's (183 vs 362.05: 1.1% off)
        assert acc.peak_tflops("fp32") == pytest.approx(bf16 / 2, rel=0.02)
    assert find_accelerator("NVIDIA GeForce GTX 1080") is None
    assert device_peak_tflops(torch.device("cpu"), "bf16") is None
    assert device_peak_tflops(torch.device("cpu"), "bf16", override=3.5) == 3.5
    cfg = load_config(None, ["data.seq_length=64"], check_paths=False)
    assert ThroughputMeter(cfg, 1, torch.device("cpu")).peak is None   # CPU: no MFU column
