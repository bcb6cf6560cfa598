"""``megaponder plan`` (megaponder/train/plan.py): per-rank memory before launch.

* Against DeepSpeed's own estimators of ZeRO model states (bf16 mixed precision, the only
  precision they describe): ZeRO-2 equal, ZeRO-3 equal plus the 16-bit weight partition
  (2 bytes x params / dp) that DeepSpeed's ZeRO-3 estimator leaves out.
* Against the live tensor bytes measured in real 2-process DeepSpeed training (gloo, fp32,
  d=64, 4 layers, vocab 512, seq 64, micro-batch 4, 2 micro-batches per step, 3 steps) at
  ZeRO 0-3 over dp=2, tp=2 and pp=2 (both stages): the plan's total per rank within 15%.
  The measurement counts every tensor storage alive (weights, gradients, Adam state,
  DeepSpeed's flat buffers and bucket, activations, the batch) with the same LiveBytes
  tracker on real tensors; ``parallel.zero_bucket_size`` is set small there so the model's
  own memory is what is compared (DeepSpeed's default bucket alone is 2 GB).
* ``plan`` runs on every pythia-*/llama-* recipe (model states and FLOPs on the meta device;
  the fake forward for the smallest one), and training refuses a micro-batch that cannot fit
  in one line, exit 2, before building anything.
"""
import glob
import os
import subprocess
import sys

import pytest

from dist_utils import run_distributed
from test_train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: (name, tp, pp, zero)
LAYOUTS = [("dp2_z0", 1, 1, 0), ("dp2_z1", 1, 1, 1), ("dp2_z2", 1, 1, 2), ("dp2_z3", 1, 1, 3),
           ("tp2_z1", 2, 1, 1), ("pp2_z1", 1, 2, 1)]


def _config(tp, pp, zero, family="adaponderlm"):
    from parallel_checks import family_config
    cfg = family_config(family, tp, pp, zero)
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.vocab_size = 64, 4, 512
    cfg.data.seq_length = 64
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = 4, 2
    cfg.parallel.zero_bucket_size = 20_000
    return cfg


def _measure(rank, world, layouts):
    """Peak live tensor bytes of 3 real training steps, per layout, on this rank."""
    import gc

    import torch
    from megaponder.models import build_model
    from megaponder.train.engine import build_engine
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import build_topology
    from megaponder.train.memory import LiveBytes
    out = {}
    for name, tp, pp, zero in layouts:
        topo = build_topology(tp, pp, False)
        cfg = _config(tp, pp, zero)
        torch.manual_seed(0)
        model = parallelize(build_model(cfg), cfg, topo)
        gc.collect()
        with LiveBytes() as live:
            live.adopt(list(model.parameters()) + list(model.buffers()))
            engine = build_engine(model, cfg, topo)
            del model
            g = torch.Generator().manual_seed(1)
            for step in range(3):
                ids = torch.randint(0, 512, (2, 4, 64), generator=g)
                engine.step_count = step
                engine.train_step([{"input_ids": ids[j], "targets": ids[j]} for j in range(2)])
        out[name] = {"peak": live.peak, "pp_rank": topo.pp_rank}
        del engine
    return out


def test_plan_within_15_percent_of_measured_peak():
    from megaponder.train.plan import plan
    measured = run_distributed(_measure, 2, (LAYOUTS,))
    for name, tp, pp, zero in LAYOUTS:
        plans = {p.pp_rank: p for p in plan(_config(tp, pp, zero), 2)}
        for rank, per_rank in enumerate(measured):
            got = per_rank[name]
            want = plans[got["pp_rank"]].total
            assert abs(want - got["peak"]) <= 0.15 * got["peak"], (name, rank, want, got["peak"])


def test_model_states_match_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from megaponder.train.plan import model_states
    for params, largest, gpus in ((405_334_016, 51_511_296, 8), (1_414_647_808, 103_022_592, 16)):
        _, ds2 = estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=False)
        assert sum(model_states(params, "bf16", 2, gpus)) == pytest.approx(ds2, abs=2)
        _, ds3, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, cpu_offload=False)
        assert sum(model_states(params, "bf16", 3, gpus, largest)) == pytest.approx(
            ds3 + 2 * params / gpus, abs=2)
    # ZeRO-1 partitions the optimizer only: more than ZeRO-2, less than ZeRO-0
    z = [sum(model_states(10**6, "bf16", s, 4)) for s in range(4)]
    assert z[0] > z[1] > z[2] > z[3]


def test_plan_runs_for_every_recipe():
    from megaponder.config import load_config
    from megaponder.train.plan import model_states, parameter_count, step_flops
    recipes = sorted(glob.glob(os.path.join(REPO, "examples/configs/pythia-*.yml"))
                     + glob.glob(os.path.join(REPO, "examples/configs/llama-*.yml")))
    assert len(recipes) >= 50
    for path in recipes:
        cfg = load_config(path, check_paths=False)
        # what a GPU user wants on: compiled layers, fused AdamW, the fastest attention kernel
        assert cfg.model.compile and cfg.optim.fused and cfg.model.attention_backend == "auto", path
        params = parameter_count(cfg)
        assert params > 5e7, path
        states = sum(model_states(params, cfg.train.precision, cfg.parallel.zero_stage, 8))
        total, per_rank = step_flops(cfg, 8)
        assert states > 0 and total == pytest.approx(8 * per_rank)
    # the whole command, fake forward included, on the smallest recipe
    out = subprocess.run([sys.executable, "-m", "megaponder", "plan", "--config",
                          os.path.join(REPO, "examples/configs/pythia-70m-adaponderlm.yml"),
                          "--world-size", "2", "--device", "H100", "--set", "parallel.pp=2",
                          "--set", "data.seq_length=256"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2, out.stdout   # one per pipeline stage
    assert "H100 SXM, 80 GB" in out.stdout and "training FLOPs per optimizer step" in out.stdout


def test_train_refuses_a_micro_batch_that_cannot_fit(tmp_path, demo_data):
    out = train(tmp_path / "run", demo_data, "train.micro_batch_size=100000000", check=False)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.micro_batch_size=100000000 cannot fit" in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
