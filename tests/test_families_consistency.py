"""Train–test consistency: the dense training forwards equal the KV-cached decoders that compute
only what inference needs (active rows, kept latent steps), 1e-5 in fp32; each identity on
both backbones (GPT-NeoX, and LLaMA with grouped-query attention: the caches hold the
num_kv_heads heads)."""
import pytest
import torch

from megaponder.infer.decoders import decode_logits
from test_families_helpers import BACKBONES, force_ada_gates, force_router, real_batch, tiny

TOL = 1e-5


# llama doubles each identity once; where a test has several variants, only the first one
# (the variants exercise family options, not the backbone) to keep the suite's cost low
@pytest.mark.parametrize("readout, backbone", [("last_active", "neox"), ("final", "neox"),
                                               ("last_active", "llama")])
def test_adaponderlm_forced_halting_matches_compacted_inference(readout, backbone):
    model = tiny("adaponderlm", steps=3, halted_readout=readout, backbone=backbone).eval()
    ids, _ = real_batch(2, 24)
    force_ada_gates(model, ids, frac=0.35)
    out = model(ids)
    # the forced pattern really halts tokens at different iterations
    fracs = [float(out.stats[f"active_frac/{i}"]) for i in range(4)]
    assert fracs[0] == 1.0 and 0.0 < fracs[-1] < fracs[1] < 1.0, fracs
    for chunk in (None, 1, 5):
        logits, decs = decode_logits(model, ids, chunk=chunk, return_decoders=True)
        assert (logits - out.logits).abs().max().item() < TOL, chunk
        # the decoder skipped exactly the halted rows
        executed = torch.stack([d.executed() for d in decs], dim=1).float()  # [P, B, T]
        assert executed.mean(dim=(1, 2)).tolist() == pytest.approx(fracs, abs=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adaponderlm_kv_reuse_is_what_the_training_forward_does(backbone):
    """Halted tokens keep the K/V of their last active iteration: changing a halted token's
    later input embedding must not change anything."""
    model = tiny("adaponderlm", steps=2, backbone=backbone).eval()
    ids, _ = real_batch(1, 16)
    force_ada_gates(model, ids, frac=0.5)
    base = model(ids).logits
    # prefix property: no future token leaks into earlier logits or halting decisions
    for t in (5, 11):
        assert (model(ids[:, :t]).logits - base[:, :t]).abs().max().item() < TOL


# neox only (the slowest identity); on llama PonderLM-3's decoder identity is the hard-prune
# test below
def test_ponderlm3_soft_mask_matches_hard_pruning():
    model = tiny("ponderlm3", steps=3).eval()
    force_router(model)
    ids, _ = real_batch(2, 12)
    out = model(ids, jacobi_passes=4 * 12)
    steps_mean = float(out.stats["mean_iters"])
    assert 1.0 < steps_mean < 4.0  # tokens really prune different numbers of steps
    for chunk in (None, 1):
        logits, decs = decode_logits(model, ids, chunk=chunk, return_decoders=True)
        assert (logits - out.logits).abs().max().item() < TOL
        executed = torch.cat([d.executed() for d in decs]).float().mean()
        assert float(executed) == pytest.approx(steps_mean, abs=1e-6)
    # 1-token-at-a-time: a prefix gives the same logits and routing as the full sequence
    for t in (4, 9):
        pre = model(ids[:, :t], jacobi_passes=4 * t)
        assert (pre.logits - out.logits[:, :t]).abs().max().item() < TOL


@pytest.mark.parametrize("own, backbone", [(True, "neox"), (False, "neox"), (True, "llama")])
def test_ponderlm3_train_hard_prune_equals_inference_for_any_router(own, backbone):
    model = tiny("ponderlm3", steps=2, train_hard_prune=True, bias_own_steps=own, tau=0.2,
                 backbone=backbone).eval()
    with torch.no_grad():
        model.router.fc2.weight.mul_(300.0)  # some w fall below tau, not far below
    ids, _ = real_batch(2, 10)
    out = model(ids, jacobi_passes=3 * 10)
    assert float(out.stats["mean_iters"]) < 3.0
    assert (decode_logits(model, ids) - out.logits).abs().max().item() < TOL


@pytest.mark.parametrize("K, J, backbone", [(1, 6, "neox"), (2, 12, "neox"), (1, 6, "llama")])
def test_ponderlm2_jacobi_converges_to_sequential_chain(K, J, backbone):
    """Jacobi on the causal chain is exact after at most K*T passes; in practice it contracts
    geometrically: T=12 needs J=6 (K=1) / J=12 (K=2) for 1e-5 on this tiny model."""
    model = tiny("ponderlm2", steps=K, backbone=backbone).eval()
    ids, _ = real_batch(2, 12)
    seq = decode_logits(model, ids, chunk=1)
    assert (model(ids, jacobi_passes=J).logits - seq).abs().max().item() < TOL
    assert (model(ids, jacobi_passes=K * 12).logits - seq).abs().max().item() < TOL
    errs = [(model(ids, jacobi_passes=j).logits - seq).abs().max().item() for j in (0, 2, 4)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("family, backbone", [
    (f, "neox") for f in ("vanilla", "ponderlm", "loop", "pause")] + [
    (f, "llama") for f in ("vanilla", "ponderlm", "loop")])
def test_fixed_depth_families_match_their_decoders(family, backbone):
    model = tiny(family, backbone=backbone).eval()
    ids, _ = real_batch(2, 10)
    ref = model(ids).logits
    for chunk in (None, 1, 4):
        assert (decode_logits(model, ids, chunk=chunk) - ref).abs().max().item() < TOL


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fixed_pruning_decoder_matches_when_the_plan_agrees(backbone):
    """The pruning baseline shares AdaPonderLM's halting machinery; with a schedule the decoder
    draws identically (here: no pruning reachable) the two paths agree."""
    model = tiny("fixed_pruning", target_flops_ratio=100.0, backbone=backbone).eval()
    ids, _ = real_batch(1, 10)
    assert (decode_logits(model, ids) - model(ids).logits).abs().max().item() < TOL
