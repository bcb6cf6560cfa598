"""Train–test consistency: the dense training forwards equal the KV-cached decoders that compute
only what inference needs (active rows, kept latent steps), 1e-5 in fp32; each identity on
both backbones (GPT-NeoX, and LLaMA with grouped-query attention: the caches hold the
num_kv_heads heads)."""
import pytest
import torch

from megaponder.models.decoders import decode_logits
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


def _stack_calls(model):
    """Record every (hidden, kvs) the model's stack returns during the next forwards."""
    calls = []
    handle = model.stack.register_forward_hook(lambda mod, inp, out: calls.append(out))
    return calls, handle


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adaponderlm_kv_reuse_is_what_the_training_forward_does(backbone):
    """Halted tokens keep the K/V of their last active iteration in every layer: at each pass
    i >= 1 a token inactive at i presents exactly the K/V of pass i-1, and an active token
    fresh ones; plus the prefix property (no future token leaks into earlier logits).
    Mutation tried: ``hook = None`` instead of ``_ReuseKV(...)`` in PonderLM.forward (fresh
    K/V for halted tokens) fails the equality at layer 1 on both backbones (layer 0's K/V
    depend on the unchanged input only, so they agree either way)."""
    model = tiny("adaponderlm", steps=2, backbone=backbone).eval()
    ids, _ = real_batch(1, 16)
    force_ada_gates(model, ids, frac=0.5)
    calls, handle = _stack_calls(model)
    out = model(ids, return_token_stats=True)
    handle.remove()
    base = out.logits
    iters = out.stats["token_iterations"]            # [B, T]: passes each token executed
    assert len(calls) == 3
    checked = 0
    for i in range(1, 3):
        halted = iters <= i                            # inactive at pass i
        assert halted.any() and (~halted).any(), (i, iters)
        for layer, ((k, v), (k_prev, v_prev)) in enumerate(zip(calls[i][1], calls[i - 1][1])):
            m = halted[:, None, :, None].expand_as(k)
            assert torch.equal(k[m], k_prev[m]) and torch.equal(v[m], v_prev[m]), (i, layer)
            if layer > 0:   # the active tokens really changed, so the check above can fail
                assert (k[~m] - k_prev[~m]).abs().max() > 1e-4
                checked += 1
    assert checked > 0
    # prefix property: no future token leaks into earlier logits or halting decisions
    for t in (5, 11):
        assert (model(ids[:, :t]).logits - base[:, :t]).abs().max().item() < TOL


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adaponderlm_halting_mask_is_monotonic(backbone):
    """A token whose gate fell below tau stays halted even when a later gate reopens:
    token_iterations = 1 + the first iteration with s < tau (K+1 when none).
    Mutation tried: ``new_active = s >= tau`` (dropping ``active &``) in PonderLM.forward
    lets reopened tokens count again and fails the equality."""
    model = tiny("adaponderlm", steps=3, backbone=backbone).eval()
    ids, _ = real_batch(2, 24)
    force_ada_gates(model, ids, frac=0.4)
    gates = []
    handles = [g.register_forward_hook(lambda mod, inp, out: gates.append(torch.sigmoid(out.squeeze(-1))))
               for g in model.gates]
    out = model(ids, return_token_stats=True)
    for h in handles:
        h.remove()
    below = torch.stack(gates) < model.ponder_cfg.tau            # [K, B, T]
    # the forced gates reopen some halted tokens, so the rule is really exercised
    reopened = below[0] & ~below[1]
    assert reopened.any()
    first = torch.where(below.any(0), below.float().argmax(0) + 1, torch.full_like(below[0], 4, dtype=torch.long))
    assert torch.equal(out.stats["token_iterations"].long(), first)


def test_ponderlm3_survival_is_the_tail_sum_of_the_router_distribution():
    """w_k = sum_{j>=k} s_j (w_0 = 1): the probability of reaching step k.
    Mutation tried: log w from the forward cumulative sum (no flips) fails."""
    from megaponder.models.latent import log_survival
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    s, log_w = log_survival(logits)
    ref = torch.softmax(logits, -1).flip(-1).cumsum(-1).flip(-1)
    ref[:, 0] = 1.0
    assert torch.allclose(s, torch.softmax(logits, -1), atol=1e-6)
    assert torch.allclose(log_w.exp(), ref, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ponderlm3_soft_survival_bias_masks_like_pruning(backbone):
    """With a near one-hot router the soft training bias log w (about -1e3 on steps beyond a
    token's choice) must compute what the cached decoder computes with those steps never run
    (it only computes kept steps, an independent implementation); a missing or wrong bias
    leaves the steps visible, or hides kept ones, and changes the logits.
    Mutations tried: key_bias_values returning zeros (no survival bias) fails against both
    references; log s instead of log w in pass_bias (hides the steps a token keeps) fails
    against the decoder (the hard-pruned forward shares the bias, so it agrees)."""
    model = tiny("ponderlm3", steps=2, backbone=backbone)
    force_router(model)
    ids, _ = real_batch(2, 10)
    model.train()
    soft = model(ids, jacobi_passes=3 * 10)
    model.eval()
    hard = model(ids, jacobi_passes=3 * 10)
    steps = float(hard.stats["mean_iters"])
    assert 1.0 < steps < 3.0        # tokens prune different numbers of steps
    assert (soft.logits - hard.logits).abs().max().item() < TOL
    assert (soft.logits - decode_logits(model, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ponderlm3_reads_the_router_weighted_mixture(backbone):
    """Training readout: logits = head(sum_k s_k h^(k)) with s = softmax(router(h^(0))) of the
    final pass, for a soft (non one-hot) router.
    Mutations tried: reading the last stage (hidden[:, :, -1]) and reading the argmax stage
    each fail; so does a router fed the last stage instead of step 0."""
    model = tiny("ponderlm3", steps=2, backbone=backbone).train()
    with torch.no_grad():
        model.router.fc2.weight.normal_(std=0.3)
    captured = {}
    inner = model.latent_forward

    def spy(*args, **kwargs):
        captured["out"] = inner(*args, **kwargs)
        return captured["out"]

    model.latent_forward = spy
    ids, _ = real_batch(2, 12)
    out = model(ids, jacobi_passes=3)
    hidden = captured["out"][0]                           # [B, T, K+1, d] of the final pass
    s = torch.softmax(model.router(hidden[:, :, 0]).float(), -1)
    assert s.max() < 0.95 and s.min() > 0.01              # really a mixture
    ref = model.head(torch.einsum("btk,btkd->btd", s.to(hidden.dtype), hidden))
    assert (out.logits - ref).abs().max().item() < TOL
    assert (out.logits - model.head(hidden[:, :, -1])).abs().max().item() > 1e-3


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
