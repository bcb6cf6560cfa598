"""Multi-process parity: every parallel layout against the single-process model (gloo, CPU).

Two spawns (2 and 4 processes) each run several checks to share start-up cost.

Tolerances:
  * float64 forward/backward: logits 1e-12 abs, loss/grad 1e-6 rel — the vocab-parallel
    cross-entropy (like the single-device ``lm_cross_entropy``) runs in fp32 by design, so
    the loss and the gradients carry fp32 rounding (~1e-7); everything else is fp64 math in
    a different summation order.
  * 5 DeepSpeed optimizer steps in fp32 (torch AdamW, lr 1e-2, clipping at 0.5 so the
    distributed gradient norm is exercised): losses within 1e-5 relative (the issue's bar;
    we see ~5e-8), gradient norms within 1e-5 relative; final weights within 1e-5 relative
    L2 over all parameters, and 2e-4 absolute per element: Adam divides by sqrt(v), so
    entries whose gradient is at rounding level (a few q/k biases) move by up to ~1e-5 of
    lr-sized steps differently under any other summation order (measured 1.5e-5 at most).
"""
import pytest

from dist_utils import run_distributed
from parallel_checks import run_checks

PLAN_2 = [
    ("fwd_tp2", "fwd", 2, 1, 0, False),
    ("fwd_tp2_sp", "fwd", 2, 1, 0, True),
    ("fwd_pp2", "fwd", 1, 2, 0, False),
    ("dropout_tp2", "dropout", 2, 1, 0, False),
    ("dropout_tp2_sp", "dropout", 2, 1, 0, True),
    ("train_tp2_z1", "train", 2, 1, 1, False),
    ("train_tp2_sp_z0", "train", 2, 1, 0, True),
    ("train_pp2_z1", "train", 1, 2, 1, False),
    ("train_dp2_z1", "train", 1, 1, 1, False),
    ("train_dp2_z2", "train", 1, 1, 2, False),
    ("train_dp2_z3", "train", 1, 1, 3, False),
]
PLAN_4 = [
    ("train_tp2_pp2_z1", "train", 2, 2, 1, False),
    ("train_tp2_dp2_z3", "train", 2, 1, 3, False),
    ("train_tp2_sp_dp2_z2", "train", 2, 1, 2, True),
    ("train_pp2_dp2_z1", "train", 1, 2, 1, False),
]

_cache = {}


def _results(world):
    if world not in _cache:
        plan = PLAN_2 if world == 2 else PLAN_4
        _cache[world] = run_distributed(run_checks, world, (plan,), timeout=900)
    return _cache[world]


def _check_fwd(res):
    assert res["logits_abs"] < 1e-12, res
    assert res["loss_rel"] < 1e-6, res
    assert res["grad_rel"] < 1e-6, res
    assert res["ce_rel"] < 1e-6 and res["pe_abs"] < 1e-12 and res["pe_grad_abs"] < 1e-6, res  # CE grad is fp32


def _check_train(res, rank0):
    for a, b in zip(res["losses"], res["ref_losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (res["losses"], res["ref_losses"])
    for a, b in res["norms"]:
        assert abs(a - b) <= 1e-5 * abs(b), res["norms"]
    if rank0:
        assert res["weights_rel_l2"] < 1e-5, res
        assert res["weights_max_abs"] < 2e-4, res
        if "roundtrip_abs" in res:
            assert res["roundtrip_abs"] == 0.0, res


@pytest.mark.parametrize("name", [p[0] for p in PLAN_2])
def test_two_processes(name):
    results = _results(2)
    for rank, per_rank in enumerate(results):
        res = per_rank[name]
        if name.startswith("fwd"):
            _check_fwd(res)
            if rank == 0:
                assert res["state_keys_equal"] and res["state_abs"] == 0.0, res
        elif name.startswith("dropout"):
            # per-TP-rank masks, replayed by checkpointing: same float32 math, same masks,
            # so only the recompute's summation order could differ (observed: identical)
            assert res["default_stream_untouched"] and res["tp_stream_advanced"], res
            assert res["ckpt_loss_rel"] <= 1e-6 and res["ckpt_grad_rel"] <= 1e-5, res
            assert abs(res["train_loss"] - res["eval_loss"]) > 1e-3, res
        else:
            _check_train(res, rank == 0)


@pytest.mark.parametrize("name", [p[0] for p in PLAN_4])
def test_four_processes(name):
    results = _results(4)
    for rank, per_rank in enumerate(results):
        _check_train(per_rank[name], rank == 0)
