"""ponder.train_compaction: the training forward that runs only the active tokens equals the
dense where-select forward, logits, losses and every gradient, 1e-5 in fp32."""
import copy

import pytest
import torch

from megaponder.config import Config
from megaponder.train.preflight import preflight
from megaponder.models.attention import AttentionSpec, attention
from megaponder.models.compaction import RowCompaction
from test_families_helpers import force_ada_gates, real_batch, tiny

TOL = 1e-5


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_flat_queries_attend_like_their_rows(backend):
    """attention() with the packed tokens of all rows as one flat query block equals the
    same queries laid out as padded [B, A] rows (what it hands the kernel)."""
    torch.manual_seed(0)
    active = torch.rand(3, 16) < 0.5
    active[1] = False
    active[1, 5] = True   # rows of 1 and of many active tokens
    comp = RowCompaction(active, prev_kv=None, detach=False)
    b, h, d = 3, 2, 8
    n = int(active.sum())
    q_flat = torch.randn(1, h, n, d)
    k, v = torch.randn(b, h, 16, d), torch.randn(b, h, 16, d)
    seg = (torch.arange(16) >= 7).long().expand(b, -1)   # a document boundary: masks compose
    _, _, spec = comp.inputs(torch.zeros(b, 16, 4), torch.arange(16).unsqueeze(0),
                             AttentionSpec(segment_ids=seg))
    out = attention(q_flat, k, v, spec, backend=backend)
    assert out.shape == (1, h, n, d)
    for i, (row, col) in enumerate(zip(comp.row.tolist(), comp.col.tolist())):
        # the reference: query i alone, at its key index, against its own row's keys
        one = AttentionSpec(q_index=torch.tensor([[col]]), segment_ids=seg[row:row + 1])
        ref = attention(q_flat[:, :, i:i + 1], k[row:row + 1], v[row:row + 1], one, backend="eager")
        assert (out[:, :, i:i + 1] - ref).abs().max().item() < TOL


@pytest.mark.parametrize("backend,backbone,masks", [
    ("eager", "neox", None), ("sdpa", "neox", "documents"), ("sdpa", "llama", "padding")])
def test_adaponderlm_compacted_training_equals_dense(backend, backbone, masks):
    dense = tiny("adaponderlm", backend=backend, backbone=backbone, steps=3, halting_k_max=0.3)
    ids, targets = real_batch(3, 24)
    with torch.no_grad():
        # moderate gate scale: gates stay off saturation so their gradients are not ~0
        force_ada_gates(dense, ids, frac=0.3, scale=8.0)
    dense.train()
    dense.set_step(10 ** 6)   # past the bottom-k warmup: the gate loss contributes
    comp = copy.deepcopy(dense)
    comp.ponder_cfg.train_compaction = True
    kwargs = {}
    if masks == "documents":   # two documents per row, boundaries at different places
        seg = torch.zeros_like(ids)
        seg[0, 9:], seg[1, 15:], seg[2, 4:] = 1, 1, 1
        kwargs["segment_ids"] = seg
    elif masks == "padding":   # right padding of different lengths, ignored by the loss
        pad = torch.ones_like(ids)
        pad[0, 19:], pad[2, 11:] = 0, 0
        kwargs["attention_mask"] = pad
        targets = targets.masked_fill(pad == 0, -100)
    outs = []
    for model in (dense, comp):
        out = model(ids, targets=targets, return_token_stats=True, **kwargs)
        out.loss.backward()
        outs.append(out)
    a, b = outs
    iters = a.stats["token_iterations"]
    assert torch.equal(iters, b.stats["token_iterations"])
    # a real mix: tokens halting after 1, 2, 3 passes and tokens that never halt
    assert set(iters.unique().tolist()) == {1.0, 2.0, 3.0, 4.0}, iters.unique()
    assert "ponder_loss" in a.stats
    assert (a.logits - b.logits).abs().max().item() < TOL
    assert abs(a.loss.item() - b.loss.item()) < TOL
    assert abs(a.stats["ponder_loss"].item() - b.stats["ponder_loss"].item()) < TOL
    for (name, pa), (_, pb) in zip(dense.named_parameters(), comp.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        err = (pa.grad - pb.grad).abs().max().item()
        assert err < TOL * max(1.0, pa.grad.abs().max().item()), (name, err)
    assert any(p.grad.abs().max() > 0 for n, p in comp.named_parameters() if n.startswith("gates."))


def test_random_halting_baseline_compacted_equals_dense():
    """The halting baselines decide the mask before the forward; the same packing applies."""
    dense = tiny("random_halting", steps=2, halting_rate=0.3).train()
    ids, targets = real_batch(2, 20)
    comp = copy.deepcopy(dense)
    comp.ponder_cfg.train_compaction = True
    a, b = (m(ids, targets=targets) for m in (dense, comp))
    assert 0.0 < float(a.stats["active_frac/2"]) < 1.0
    a.loss.backward(), b.loss.backward()
    assert (a.logits - b.logits).abs().max().item() < TOL
    for pa, pb in zip(dense.parameters(), comp.parameters()):
        assert (pa.grad - pb.grad).abs().max().item() < TOL


@pytest.mark.parametrize("key,value,msg", [
    ("ponder.halted_readout", "final", "halted_readout=last_active"),
    ("ponder.bottomk_pool", "all", "bottomk_pool=active"),
    ("parallel.tp", 2, "parallel.tp=2"),
])
def test_train_compaction_refuses_inexact_or_untested_settings(key, value, msg):
    cfg = Config()
    cfg.model.family = "adaponderlm"
    cfg.ponder.train_compaction = True
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(Exception, match=msg.replace(".", r"\.")):
        preflight(cfg, check_paths=False, world_size=2)


def test_compaction_when_every_token_halted_after_the_first_pass():
    dense = tiny("adaponderlm", steps=2)
    with torch.no_grad():
        for gate in dense.gates:   # s = sigmoid(-50) < tau for every token
            gate.fc2.weight.zero_()
            gate.fc2.bias.fill_(-50.0)
    comp = copy.deepcopy(dense)
    comp.ponder_cfg.train_compaction = True
    ids, targets = real_batch(2, 12)
    a, b = (m(ids, targets=targets) for m in (dense, comp))
    assert float(b.stats["active_frac/1"]) == 0.0
    a.loss.backward(), b.loss.backward()
    assert (a.logits - b.logits).abs().max().item() < TOL
    for pa, pb in zip(dense.parameters(), comp.parameters()):
        assert (pa.grad - pb.grad).abs().max().item() < TOL
