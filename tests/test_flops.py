"""Analytic FLOPs (megaponder/models/flops.py) against torch's FlopCounterMode, within 2%."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megaponder.models import flops
from megaponder.models.decoders import decode_logits
from test_families_helpers import ALL_FAMILIES, BACKBONES, force_ada_gates, force_router, real_batch, tiny

B, T = 2, 12


def computed_by_token_step(executed: torch.Tensor) -> torch.Tensor:
    """The (pass, token) slots the compacting decoder's one-token step computes, from the
    slots that were active (``executed()``, [P, T]): its one host read per token comes after
    pass 0, so a token that goes on pondering runs every later pass and a later halt is
    applied by ``where`` (models/decoders.py ``_feed_token``; with ``halted_readout=final`` the
    formulas already count the last pass for every token). The analytic FLOPs of that
    activity are what the counter must see; the paper's convention (``executed()``, every
    halted slot skipped) is at most that."""
    computed = executed.clone().bool()
    computed[1:] = computed[1:2].expand_as(computed[1:])
    return computed.to(executed.dtype)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_training_flops_match_flop_counter(family, backbone):
    model = tiny(family, steps=2, backbone=backbone).train()
    ids, targets = real_batch(B, T)
    kw = {"jacobi_passes": 2} if family in ("ponderlm2", "ponderlm3") else {}

    def step():
        model(ids, targets=targets, **kw).loss.backward()

    measured = counted(step)
    analytic = B * 3 * flops.training_forward_flops(model, T, **kw)
    assert analytic == pytest.approx(measured, rel=0.02), (analytic, measured)


# llama doubles the decoding check only for a plain cache, latent Jacobi and routed steps
# (AdaPonderLM's reuse on llama is tests/test_families_consistency.py's): cost stays low
@pytest.mark.parametrize("family, backbone", [(f, "neox") for f in ALL_FAMILIES] + [
    (f, "llama") for f in ("vanilla", "ponderlm2", "ponderlm3")])
def test_inference_flops_match_flop_counter(family, backbone):
    model = tiny(family, steps=3 if family in ("adaponderlm", "ponderlm3") else 2,
                 backbone=backbone).eval()
    ids, _ = real_batch(B, T)
    if family == "adaponderlm":
        force_ada_gates(model, ids, frac=0.35)
    if family == "ponderlm3":
        force_router(model)
    result = {}

    def run():   # row by row: the convention counts one sequence's work; a batched decoder
        # also computes padding slots when its rows halt differently (tests/test_generate.py)
        result["decs"] = [decode_logits(model, ids[b:b + 1], chunk=1, return_decoders=True)[1][0]
                          for b in range(B)]

    measured = counted(run)
    analytic = 0.0
    for dec in result["decs"]:
        activity = dec.executed() if family in ("adaponderlm", "ponderlm3", "random_halting") else None
        if family in ("adaponderlm", "random_halting"):   # vertical: the one-token step's slots
            assert flops.inference_flops(model, T, activity) <= flops.inference_flops(
                model, T, computed_by_token_step(activity))
            activity = computed_by_token_step(activity)
        analytic += flops.inference_flops(model, T, activity)
    assert analytic == pytest.approx(measured, rel=0.02), (analytic, measured)
    if family in ("adaponderlm", "ponderlm3"):  # halting really saved compute
        assert analytic < B * flops.inference_flops(model, T) * 0.95


def test_halted_readout_final_and_reuse_counted():
    model = tiny("adaponderlm", steps=3, halted_readout="final").eval()
    ids, _ = real_batch(1, T)
    force_ada_gates(model, ids, frac=0.4)
    result = {}
    measured = counted(lambda: result.update(d=decode_logits(model, ids, chunk=1, return_decoders=True)[1]))
    executed = result["d"][0].executed()
    analytic = flops.inference_flops(model, T, computed_by_token_step(executed))
    assert flops.inference_flops(model, T, executed) < analytic   # later halts cost compute here
    assert analytic == pytest.approx(measured, rel=0.02)


def test_causal_convention_and_ratios():
    model = tiny("ponderlm", steps=3)
    dense = flops.training_forward_flops(model, 64)
    causal = flops.training_forward_flops(model, 64, causal=True)
    assert causal < dense
    van = tiny("vanilla")
    # fixed-depth PonderLM K=3 costs 4x the backbone plus 3x(head + embedding mixture)
    ratio = flops.flops_ratio_from_activity(model, torch.ones(4, 64))
    assert 4.0 < ratio < 4.0 + 6 * van.cfg.padded_vocab() * 2 * 32 / (flops.inference_flops(van, 64) / 64)
    assert flops.flops_ratio_from_activity(van, torch.ones(1, 64)) == pytest.approx(1.0)
    s = flops.summary(model, 64)
    assert s["train_flops_per_token"] > s["inference_flops_per_token"]
