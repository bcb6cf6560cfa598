"""Depth-vs-difficulty analysis (megaponder/analysis/depth.py): per-token iteration counts are
exactly the executed ones under forced halting patterns, and the statistics agree with plain
Python reference computations."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from megaponder.analysis import analyze_batches, inference_pruning, pearson, per_iteration_table, rankdata, spearman, token_depth
from megaponder.models.decoders import decode_logits
from test_families_helpers import force_ada_gates, force_router, real_batch, tiny


# -- plain-Python references ------------------------------------------------------------------
def ref_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def ref_ranks(x):
    """Average ranks by counting: rank = #smaller + (#equal + 1) / 2."""
    return [sum(1 for b in x if b < a) + (sum(1 for b in x if b == a) + 1) / 2 for a in x]


def test_correlations_match_reference_with_ties():
    rng = random.Random(0)
    x = [rng.gauss(0, 1) for _ in range(200)]
    y = [rng.choice([1, 2, 2, 3, 4]) + 0.3 * a for a in x]  # continuous
    it = [rng.choice([1, 2, 3, 4]) for _ in range(200)]  # heavily tied, as iteration counts are
    assert pearson(x, y) == pytest.approx(ref_pearson(x, y), abs=1e-12)
    assert pearson(x, it) == pytest.approx(ref_pearson(x, it), abs=1e-12)
    assert rankdata(it).tolist() == pytest.approx(ref_ranks(it))
    assert rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(x, it) == pytest.approx(ref_pearson(ref_ranks(x), ref_ranks(it)), abs=1e-12)
    # monotone transforms: Spearman 1, Pearson not
    z = [math.exp(3 * a) for a in x]
    assert spearman(x, z) == pytest.approx(1.0, abs=1e-12) and pearson(x, z) < 0.99
    assert math.isnan(pearson(x, [2.0] * 200)) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_per_iteration_table():
    nll = [0.5, 1.5, 2.0, 4.0, 3.0, 1.0]
    it = [1, 1, 4, 4, 3, 1]
    rows = per_iteration_table(nll, it)
    assert [(r["iterations"], r["count"]) for r in rows] == [(1, 3), (3, 1), (4, 2)]
    assert [r["mean_nll"] for r in rows] == pytest.approx([1.0, 3.0, 3.0])
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_adaponderlm_forced_halting_iterations_are_exact():
    model = tiny("adaponderlm", steps=3).eval()
    ids, tgt = real_batch(2, 24)
    force_ada_gates(model, ids, frac=0.35)
    # reference 1: the gates themselves (monotonic mask, tau)
    gate_out = []
    hooks = [g.register_forward_hook(lambda m, i, o: gate_out.append(torch.sigmoid(o.squeeze(-1).float())))
             for g in model.gates]
    d = token_depth(model, ids, tgt)
    for h in hooks:
        h.remove()
    active = torch.ones_like(ids, dtype=torch.bool)
    expect = torch.ones(ids.shape, dtype=torch.float64)
    for s in gate_out:
        active = active & (s >= model.ponder_cfg.tau)
        expect += active.double()
    assert torch.equal(d["iterations"], expect)
    counts = torch.bincount(expect.long().flatten(), minlength=5)[1:]
    assert (counts > 0).sum() >= 3, counts  # really a mix of exit iterations
    # reference 2: rows the compacted inference decoder actually computed
    _, decs = decode_logits(model, ids, return_decoders=True)
    executed = torch.stack([dec.executed() for dec in decs], dim=1).double().sum(0)  # [B, T]
    assert torch.equal(d["iterations"], executed)
    # NLL = the per-token cross-entropy of the model's own logits
    out = model(ids, targets=tgt)
    assert d["nll"].mean().item() == pytest.approx(out.lm_loss.item(), rel=1e-6)


def test_ponderlm3_iterations_are_the_executed_steps():
    model = tiny("ponderlm3", steps=3).eval()
    force_router(model)
    ids, tgt = real_batch(2, 12)
    d = token_depth(model, ids, tgt, jacobi_passes=4 * 12)
    _, decs = decode_logits(model, ids, return_decoders=True)
    executed = torch.stack([dec.executed() for dec in decs]).double()
    assert torch.equal(d["iterations"], executed.view_as(d["iterations"]))
    assert 1.0 < d["iterations"].mean().item() < 4.0
    # forced router is near one-hot: the soft expectation equals the executed count, except
    # where two huge router logits nearly tie (then s splits, e.g. s_3 ~ 3e-4 >= tau keeps
    # every step while the expectation stays ~1)
    agree = (d["expected_steps"] - d["iterations"]).abs() < 1e-4
    assert agree.float().mean().item() >= 0.9


@pytest.mark.parametrize("family,iters", [("vanilla", 1), ("ponderlm", 3), ("loop", 3), ("pause", 3),
                                          ("ponderlm2", 3)])
def test_fixed_depth_families_report_their_constant(family, iters):
    model = tiny(family).eval()  # steps=2: 3 passes / stages (pause: its own pause_tokens)
    ids, tgt = real_batch(1, 8)
    d = token_depth(model, ids, tgt)
    expected = float(model(ids).stats.get("mean_iters", 1.0))
    assert torch.all(d["iterations"] == expected)
    if family != "pause":
        assert expected == iters


def test_fixed_pruning_iterations_follow_the_plan():
    model = tiny("fixed_pruning", steps=3, target_flops_ratio=2.0, prune_schedule="uniform").eval()
    ids, tgt = real_batch(2, 16)
    d = token_depth(model, ids, tgt)
    plan = model.halting_plan(2, 16, ids.device, torch.ones_like(ids, dtype=torch.bool))
    assert torch.equal(d["iterations"], plan.cumprod(0).sum(0).double())
    assert d["iterations"].min() < d["iterations"].max()


def test_analyze_batches_end_to_end():
    model = tiny("adaponderlm", steps=3).eval()
    ids, _ = real_batch(2, 24)
    force_ada_gates(model, ids, frac=0.35)
    raw, _ = real_batch(2, 24)
    tokens = torch.cat([raw, real_batch(2, 24)[1][:, -1:]], dim=1)  # [B, T+1]
    res = analyze_batches(model, [{"tokens": tokens}])
    d = token_depth(model, tokens[:, :-1], tokens[:, 1:])
    nll, it = d["nll"].flatten().tolist(), d["iterations"].flatten().tolist()
    assert res["tokens"] == 48 and sum(r["count"] for r in res["per_iteration"]) == 48
    assert res["pearson"] == pytest.approx(ref_pearson(nll, it), abs=1e-12)
    assert res["spearman"] == pytest.approx(ref_pearson(ref_ranks(nll), ref_ranks(it)), abs=1e-12)
    assert res["mean_iterations"] == pytest.approx(sum(it) / 48)
    logits = model(tokens[:, :-1]).logits
    assert res["mean_nll"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item(),
                                            rel=1e-6)


def test_full_depth_counterfactual_and_entropy():
    model = tiny("adaponderlm", steps=3).eval()
    ids, _ = real_batch(2, 24)
    force_ada_gates(model, ids, frac=0.35)
    tokens = torch.cat([ids, real_batch(2, 24)[1][:, -1:]], dim=1)
    res = analyze_batches(model, [{"tokens": tokens}], compare_full_depth=True)
    assert model.ponder_cfg.tau == pytest.approx(1e-4)  # restored
    model.ponder_cfg.tau = 0.0
    full = token_depth(model, tokens[:, :-1], tokens[:, 1:])
    model.ponder_cfg.tau = 1e-4
    assert torch.all(full["iterations"] == 4.0)
    assert res["mean_nll_full_depth"] == pytest.approx(full["nll"].mean().item(), rel=1e-9)
    d = token_depth(model, tokens[:, :-1], tokens[:, 1:])
    p = torch.softmax(model(tokens[:, :-1]).logits.double(), -1)
    assert torch.allclose(d["entropy"], -(p * p.log()).sum(-1), atol=1e-5)
    assert res["entropy"]["spearman"] == pytest.approx(spearman(d["entropy"], d["iterations"]), abs=1e-12)
    assert sum(c for r in res["per_iteration"] for _, c in r["top_input_tokens"]) <= 48


def test_ponderlm3_analysis_nll_is_the_pruned_decoders():
    """The analysis evaluates PonderLM-3 with hard pruning (w just below tau here), i.e. the
    pruned decoder's NLL, not the soft-bias training forward's."""
    model = tiny("ponderlm3", steps=2, tau=0.2).eval()
    with torch.no_grad():
        model.router.fc2.weight.mul_(300.0)
    ids, _ = real_batch(2, 10)
    tokens = torch.cat([ids, real_batch(2, 10)[1][:, -1:]], dim=1)
    res = analyze_batches(model, [{"tokens": tokens}], jacobi_passes=30)
    assert res["hard_prune"] and not model.ponder_cfg.train_hard_prune and model.ponder_cfg.eval_hard_prune
    dec = decode_logits(model, tokens[:, :-1])
    ref = F.cross_entropy(dec.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert res["mean_nll"] == pytest.approx(ref, abs=1e-5)
    ref_tok = F.cross_entropy(dec.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").double()
    with inference_pruning(model):
        hard = token_depth(model, tokens[:, :-1], tokens[:, 1:], jacobi_passes=30)
    assert (hard["nll"].flatten() - ref_tok).abs().max().item() < 1e-5
    assert 1.0 < hard["iterations"].mean().item() < 3.0  # steps really pruned


@pytest.mark.parametrize("family", ["random_halting", "fixed_pruning"])
def test_analyze_batches_draws_evaluates_pattern_per_batch(family):
    """Random-pruning baselines: batch i of the analysis uses evaluate()'s draws for batch i
    (set_eval_stream), so two equal batches get two patterns and the numbers are evaluate()'s."""
    from megaponder.train.evaluate import evaluate

    model = tiny(family, steps=3, target_mean_iters=2.5).eval()
    ids, _ = real_batch(2, 20)
    batch = {"tokens": torch.cat([ids, ids[:, :1]], dim=1)}
    per_stream = []
    for stream in (0, 1):
        model.set_eval_stream(stream)
        per_stream.append(token_depth(model, ids, batch["tokens"][:, 1:]))
    assert not torch.equal(per_stream[0]["iterations"], per_stream[1]["iterations"])
    model.set_eval_stream(7)   # a stale stream must not leak into the analysis
    res = analyze_batches(model, [batch, batch])
    ref = evaluate(model, [batch, batch])
    want = torch.cat([d["iterations"].flatten() for d in per_stream]).mean().item()
    assert res["mean_iterations"] == pytest.approx(want, abs=1e-12)
    # the model's own stats are float32 (evaluate() averages them): 1e-6 relative
    assert res["mean_iterations"] == pytest.approx(ref["mean_iters"], rel=1e-6)
    assert res["mean_nll"] == pytest.approx(ref["loss"], rel=1e-6)
    assert res["flops_ratio"] == pytest.approx(ref["flops_ratio"], rel=1e-6)
