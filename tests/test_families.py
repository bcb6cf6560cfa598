"""Every family builds, trains on real tokens, reports its stats, and starts from a backbone."""
import math

import pytest
import torch

from megaponder.config import ModelConfig, PonderConfig
from megaponder.models import build_model
from megaponder.models.ponder import init_family_from_backbone
from test_families_helpers import ALL_FAMILIES, BACKBONES, real_batch, tiny


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_trains_on_real_tokens(family, backbone):
    model = tiny(family, backend="sdpa", d=32, halting_warmup_start=2, halting_warmup_end=4,
                 backbone=backbone)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids, targets = real_batch(4, 32)
    losses = []
    for step in range(8):
        model.set_step(step)
        out = model(ids, targets=targets)
        assert torch.isfinite(out.loss)
        assert out.logits.shape == (4, 32, model.vocab_size)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.lm_loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    for key in ("mean_iters", "flops_ratio"):
        assert key in out.stats
        v = out.stats[key]
        assert not (torch.is_tensor(v) and v.requires_grad)


def test_stats_of_adaptive_families():
    model = tiny("adaponderlm", steps=3)
    ids, targets = real_batch(2, 16)
    out = model(ids, targets=targets)
    for i in range(4):
        assert f"active_frac/{i}" in out.stats
    assert float(out.stats["mean_iters"]) == pytest.approx(4.0)  # gates start open
    # PonderLM at K=3 is 4x the backbone plus head/embedding overhead
    assert 4.0 < float(out.stats["flops_ratio"]) < 6.0
    p3 = tiny("ponderlm3", steps=3)(ids, targets=targets)
    assert {"mean_iters", "expected_steps", "flops_ratio", "active_frac/1"} <= set(p3.stats)


def test_bottomk_warmup_and_loss():
    model = tiny("adaponderlm", halting_warmup_start=10, halting_warmup_end=20, halting_k_max=0.1)
    assert model.bottomk_fraction(5) == 0.0
    assert model.bottomk_fraction(15) == pytest.approx(0.05)
    assert model.bottomk_fraction(25) == pytest.approx(0.1)
    ids, targets = real_batch(2, 16)
    model.set_step(0)
    out = model(ids, targets=targets)
    assert "ponder_loss" not in out.stats and float(out.loss) == pytest.approx(float(out.lm_loss))
    model.set_step(30)
    out = model(ids, targets=targets)
    assert float(out.loss) > float(out.lm_loss)
    # the bottom-k term pulls the smallest gates down: gradient only reaches the gates
    out.loss.backward()
    assert model.gates[0].fc2.bias.grad is not None


def test_gates_can_halt_and_halted_tokens_are_frozen():
    model = tiny("adaponderlm", steps=2, gate_bias_init=-50.0)  # every gate closed
    ids, _ = real_batch(1, 8)
    out = model(ids)
    assert float(out.stats["mean_iters"]) == pytest.approx(1.0)
    # all halted after iteration 0 -> logits are those of the first pass
    with torch.no_grad():
        h, _ = model.stack(model.input_embeddings(ids), torch.arange(8).unsqueeze(0))
    assert (model.head(h) - out.logits).abs().max() < 1e-5


def test_jacobi_count_is_reproducible_from_the_step():
    model = tiny("ponderlm2", jacobi_passes=[2, 3, 4, 5, 6]).train()
    draws = []
    for _ in range(2):
        seq = []
        for step in range(6):
            model.set_step(step)
            seq.append(model.jacobi_count())
        draws.append(seq)
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    model.eval()
    assert model.jacobi_count() is None  # eval_mode exact: iterate to the tolerance
    model.ponder_cfg.eval_mode = "official"
    assert model.jacobi_count() == model.ponder_cfg.eval_jacobi_passes


def test_pruning_baselines_hit_their_flops_target():
    for family, kind in [("fixed_pruning", "uniform"), ("fixed_pruning", "geometric"), ("random_halting", None)]:
        extra = {"prune_schedule": kind} if kind else {}
        model = tiny(family, steps=3, target_flops_ratio=3.2, **extra)
        r = model.keep_fractions()
        assert r[0] == 1.0 and all(a >= b for a, b in zip(r, r[1:]))
        ids, _ = real_batch(8, 64)
        out = model(ids)
        assert float(out.stats["flops_ratio"]) == pytest.approx(3.2, rel=0.08)
        assert float(out.stats["mean_iters"]) < 4.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_init_family_from_backbone_keeps_backbone_tensors(family):
    vanilla = tiny("vanilla", seed=1)
    sd = {k: v.clone() for k, v in vanilla.state_dict().items()}
    model = tiny(family, seed=2, gate_bias_init=3.0)
    report = init_family_from_backbone(model, sd)
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    fresh = set(model.extra_parameter_names())
    assert set(report["fresh"]) == fresh
    assert all(("gate" in n) or ("router" in n) or ("pause" in n) for n in fresh)
    if family == "adaponderlm":
        assert float(model.gates[0].fc2.bias) == 3.0
        assert fresh
    if family == "vanilla":
        assert not fresh
    with pytest.raises(KeyError):
        init_family_from_backbone(tiny(family), {k: v for k, v in sd.items() if "embed_out" not in k})


def test_depth_scaled_init():
    a = tiny("ponderlm", steps=3, depth_scaled_init=True, seed=3)
    b = tiny("ponderlm", steps=3, depth_scaled_init=False, seed=3)
    wa, wb = a.stack.layers[0].mlp.fc2.weight, b.stack.layers[0].mlp.fc2.weight
    assert torch.allclose(wa, wb / 2.0)
    assert torch.equal(a.stack.layers[0].mlp.fc1.weight, b.stack.layers[0].mlp.fc1.weight)


def test_ponder_embedding_uses_input_table_and_top_k():
    model = tiny("ponderlm", top_k=0)
    logits = torch.randn(2, 3, model.vocab_size)
    full = model.ponder_embedding(logits)
    assert torch.allclose(full, torch.softmax(logits, -1) @ model.embed_in.weight, atol=1e-6)
    model.ponder_cfg.top_k = model.vocab_size - 1
    assert torch.allclose(model.ponder_embedding(logits), full, atol=1e-3)


def test_ponderlm3_router_and_penalty():
    model = tiny("ponderlm3", steps=3, compute_penalty=0.5)
    ids, targets = real_batch(2, 8)
    out = model(ids, targets=targets)
    assert float(out.loss) > float(out.lm_loss)
    out.loss.backward()
    assert model.router.fc2.weight.grad.abs().sum() > 0
    from megaponder.models.latent import log_survival
    s, log_w = log_survival(torch.randn(5, 4))
    w = log_w.exp()
    assert torch.allclose(w[:, 0], torch.ones(5)) and (w[:, 1:] <= w[:, :-1] + 1e-6).all()
    assert torch.allclose(w, s.flip(-1).cumsum(-1).flip(-1), atol=1e-6)


def test_loop_is_weight_shared_depth():
    model = tiny("loop", steps=1)
    ids, _ = real_batch(1, 6)
    pos = torch.arange(6).unsqueeze(0)
    x = model.input_embeddings(ids)  # sqrt(2.5 d) scaled, as the official loop baseline
    for _ in range(2):
        x, _ = model.stack(x, pos, apply_final_norm=False)
    assert (model.head(model.stack.final_norm(x)) - model(ids).logits).abs().max() < 1e-5


def test_config_doc_is_current(repo_root):
    import os
    from megaponder.config import reference_markdown
    with open(os.path.join(repo_root, "docs", "config.md")) as f:
        assert f.read().strip() == reference_markdown().strip()


def test_example_configs_load_and_tiny_ones_build(repo_root):
    import glob
    import os
    from megaponder.config import load_config
    paths = sorted(glob.glob(os.path.join(repo_root, "examples", "configs", "*-*.yml")))
    families = set()
    for path in paths:
        cfg = load_config(path, check_paths=False)
        families.add(cfg.model.family)
        if os.path.basename(path).startswith("tiny-"):
            assert build_model(cfg) is not None
    assert families >= set(ALL_FAMILIES) - {"vanilla"}
    for size in ("70m", "160m", "410m", "1.4b", "2.8b"):
        for fam in set(ALL_FAMILIES) - {"vanilla"}:
            assert os.path.exists(os.path.join(repo_root, "examples", "configs", f"pythia-{size}-{fam}.yml"))
