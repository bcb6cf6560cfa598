"""Numbers comparable with the papers: the two compute scales, the baselines' iso-FLOPs target,
exact evaluation of the latent families, the official initialisations, per-batch evaluation
draws shared with the decoder, and AdaPonderLM started from PonderLM."""
import math

import pytest
import torch

from megaponder.config import Config, ConfigError, ModelConfig, PonderConfig, validate
from megaponder.models import build_model, flops
from megaponder.infer.decoders import decode_logits
from megaponder.models.ponder import preserve_loaded_function
from megaponder.train.evaluate import evaluate
from test_families_helpers import force_router, real_batch, tiny

# Pythia shapes (d, layers); MLP 4d, vocabulary padded to 50304, context 2048
PYTHIA = {"70m": (512, 6), "410m": (1024, 24), "2.8b": (2560, 32)}
V, T = 50304, 2048


def ponderlm_ratio_by_hand(d: int, n_layers: int, passes: int) -> float:
    """PonderLM, every token active, KV-cached decoding of T tokens against vanilla: per layer
    and row QKV + out + MLP = 2(4d^2 + 2d*4d) FLOPs, attention 4d per key (p+1 keys at
    position p); the head 2dV on every pass (P-1 pondering distributions + the readout), the
    pondering embedding softmax @ W_in another 2Vd on the P-1 extra passes."""
    linear = 2 * (4 * d * d + 2 * d * 4 * d)
    backbone = n_layers * (T * linear + 4 * d * T * (T + 1) / 2)
    vanilla = backbone + T * 2 * d * V
    ponder = passes * backbone + passes * T * 2 * d * V + (passes - 1) * T * 2 * V * d
    return ponder / vanilla


def pythia_dims(family: str, size: str) -> flops.Dims:
    d, n_layers = PYTHIA[size]
    cfg = ModelConfig(family=family, vocab_size=50277, padded_vocab_size=V, hidden_size=d,
                      num_layers=n_layers, num_heads=8)
    return flops.Dims.of(cfg=cfg, ponder=PonderConfig(steps=3))


@pytest.mark.parametrize("size,rounded", [("70m", 5.5), ("410m", 4.4), ("2.8b", 4.1)])
def test_flops_ratio_is_not_the_papers_4x_at_pythia_shapes(size, rounded):
    """mean_iters (the papers' scale) is 4 for PonderLM K=3; flops_ratio counts the head and
    the pondering embedding and is well above 4 in small models."""
    dm = pythia_dims("ponderlm", size)
    ratio = flops.flops_ratio_from_activity(dm, torch.ones(4, T), T)
    assert ratio == pytest.approx(ponderlm_ratio_by_hand(*PYTHIA[size], 4), rel=1e-9)
    assert round(ratio, 1) == rounded


@pytest.mark.parametrize("size", list(PYTHIA))
def test_baselines_are_iso_passes_with_adaponderlm(size):
    """Default target: 3.8 backbone passes per token (AdaPonderLM's published number). On
    that scale both sides run the same passes; on the full scale the baseline is cheaper by
    exactly AdaPonderLM's gate MLPs (same activity, no gates)."""
    ada = pythia_dims("adaponderlm", size)
    for kind in ("uniform", "geometric"):
        keep = flops.schedule_for_mean_iters(ada, 3.8, kind)
        assert keep[0] == 1.0 and sum(keep) == pytest.approx(3.8, abs=1e-9)
        assert all(a >= b for a, b in zip(keep, keep[1:]))
        act = torch.tensor(keep, dtype=torch.float64).unsqueeze(1).expand(4, T)
        base = flops.Dims(**{**ada.__dict__, "family": "fixed_pruning"})
        d = ada.d
        gate = 2 * (d * 4 * d + 4 * d)
        vanilla = flops.inference_flops(flops.Dims(**{**ada.__dict__, "family": "vanilla"}), T)
        gap = flops.flops_ratio_from_activity(ada, act, T) - flops.flops_ratio_from_activity(base, act, T)
        assert gap == pytest.approx(sum(keep[:-1]) * T * gate / vanilla, rel=1e-9)


def test_pruning_baselines_default_to_3_8_passes():
    ids, _ = real_batch(4, 60)
    for family, kind in [("fixed_pruning", "uniform"), ("fixed_pruning", "geometric"), ("random_halting", None)]:
        extra = {"prune_schedule": kind} if kind else {}
        model = tiny(family, steps=3, **extra).eval()
        assert sum(model.keep_fractions()) == pytest.approx(3.8, abs=1e-9)
        mean_iters = float(model(ids).stats["mean_iters"])
        # fixed pruning keeps round(r_i * 60) tokens: exact to 1/60 per iteration
        tol = 3 * 0.5 / 60 if family == "fixed_pruning" else 0.12
        assert mean_iters == pytest.approx(3.8, abs=tol)
    cfg = Config()
    cfg.ponder.target_mean_iters, cfg.ponder.target_flops_ratio = 3.8, 4.9
    with pytest.raises(ConfigError, match="both set"):
        validate(cfg, check_paths=False)


# -- exact evaluation of PonderLM-2/3 -----------------------------------------------------
@pytest.mark.parametrize("family", ["ponderlm2", "ponderlm3"])
def test_exact_eval_matches_the_cached_decoder_official_does_not(family):
    model = tiny(family, steps=2, seed=1).eval()
    if family == "ponderlm3":
        force_router(model)     # tokens prune different numbers of steps
    ids, targets = real_batch(2, 16)
    seq, decs = decode_logits(model, ids, chunk=1, return_decoders=True)
    out = model(ids)
    assert model.ponder_cfg.eval_mode == "exact"
    assert out.stats["jacobi_residual"] <= model.ponder_cfg.eval_jacobi_tol
    # thoughts within 1e-5 of the fixed point: the logits follow within a small multiple
    assert (out.logits - seq).abs().max().item() < 1e-4
    model.ponder_cfg.eval_mode = "official"
    official = model(ids)
    assert official.stats["jacobi_passes"] == 3.0
    assert (official.logits - seq).abs().max().item() > 1e-4   # 3 passes are not converged
    model.ponder_cfg.eval_mode = "exact"
    res = evaluate(model, [{"tokens": torch.cat([ids, targets[:, -1:]], dim=1)}])
    assert res["eval_mode"] == "exact" and res["jacobi_passes"] > 3
    assert res["jacobi_residual"] <= model.ponder_cfg.eval_jacobi_tol
    ref = torch.nn.functional.cross_entropy(seq.flatten(0, 1), targets.flatten()).item()
    assert res["loss"] == pytest.approx(ref, abs=1e-4)
    if family == "ponderlm3":
        # perplexity and FLOPs of the same pruned computation: the decoder's executed steps
        executed = torch.stack([d.executed() for d in decs])  # [B, T]
        assert res["hard_prune"] and res["mean_iters"] == pytest.approx(float(executed.mean()), abs=1e-6)
        per_pos = executed.mean(0)
        assert res["flops_ratio"] == pytest.approx(flops.flops_ratio_from_activity(model, per_pos), rel=1e-6)
        # the depth analysis reports the same computation on both scales
        from megaponder.analysis import analyze_batches
        depth = analyze_batches(model, [{"tokens": torch.cat([ids, targets[:, -1:]], dim=1)}])
        assert depth["eval_mode"] == "exact" and depth["hard_prune"]
        assert depth["mean_iterations"] == pytest.approx(res["mean_iters"], abs=1e-6)
        assert depth["flops_ratio"] == pytest.approx(res["flops_ratio"], rel=1e-6)


# -- initialisation -------------------------------------------------------------------------
TRUNC3 = math.sqrt(1 - 2 * 3 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))


@pytest.mark.parametrize("family", ["vanilla", "ponderlm", "adaponderlm", "loop", "ponderlm2",
                                    "ponderlm3", "pause", "fixed_pruning"])
def test_official_init_statistics(family):
    d, n_layers, K = 256, 2, 3
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=512, hidden_size=d, num_layers=n_layers, num_heads=4)
    model = build_model(cfg, PonderConfig(steps=K, pause_tokens=K))
    sigma = math.sqrt(2 / (5 * d))
    if family == "vanilla":   # Pythia's GPT-NeoX small_init / wang_init, plain normal
        in_std, out_std, factor = sigma, 2 / (n_layers * math.sqrt(d)), 1.0
    else:                      # official truncated normal (+-3 sigma)
        depth = 1 if family == "pause" else K + 1
        in_std, out_std, factor = sigma, sigma / math.sqrt(2 * n_layers * depth), TRUNC3
    for name, w in model.named_parameters():
        if name.startswith(("gates.", "router.", "pause_embedding")) or w.dim() < 2:
            continue
        want = (out_std if name.endswith(("attn.out.weight", "mlp.fc2.weight")) else in_std) * factor
        assert w.std().item() == pytest.approx(want, rel=0.03), name
        if family != "vanilla":
            assert w.abs().max().item() <= 3 * want / factor + 1e-7, name
    scale = {"loop": math.sqrt(2.5 * d), "ponderlm2": math.sqrt(2.5 * d), "ponderlm3": math.sqrt(2.5 * d),
             "pause": math.sqrt(d), "ponderlm": math.sqrt(d), "adaponderlm": math.sqrt(d)}
    if family in scale:
        ids = torch.arange(8).view(1, 8)
        emb = model.input_embeddings(ids)
        assert torch.allclose(emb, model.embed_in(ids) * scale[family], rtol=1e-6)


def test_named_init_methods_are_kept():
    torch.manual_seed(0)
    cfg = ModelConfig(family="ponderlm", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4,
                      init_method="small_init_wang")
    model = build_model(cfg, PonderConfig(steps=3))
    fc2 = model.stack.layers[0].mlp.fc2.weight
    assert fc2.std().item() == pytest.approx(2 / (2 * math.sqrt(256)) / 2, rel=0.03)


# -- evaluation randomness ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["random_halting", "fixed_pruning"])
def test_eval_draws_per_batch_reproducible_and_shared_with_decoder(family):
    model = tiny(family, steps=3, target_mean_iters=2.5).eval()
    ids, _ = real_batch(2, 20)

    def plan(stream):
        model.set_eval_stream(stream)
        return model.halting_plan(2, 20, ids.device, torch.ones(2, 20, dtype=torch.bool))

    assert torch.equal(plan(0), plan(0))
    assert not torch.equal(plan(0), plan(1))
    if family == "random_halting":   # the forward's rule is the decoder's: identical logits
        for stream, chunk in ((0, None), (5, 3)):
            model.set_eval_stream(stream)
            ref = model(ids).logits
            got = decode_logits(model, ids, chunk=chunk, seed=stream)
            assert (got - ref).abs().max().item() < 1e-5
    else:   # same uniforms; the decoder applies the causal rule u < r_i to them
        model.set_eval_stream(4)
        u = model.priorities(2, 20, ids.device)
        _, decs = decode_logits(model, ids, seed=4, return_decoders=True)
        executed = torch.stack([d.executed() for d in decs], dim=1)  # [P, B, T]
        assert torch.equal(executed.bool(), model.threshold_plan(u))
    # evaluate() gives every batch its own draws
    batch = {"tokens": torch.cat([ids, ids[:, :1]], dim=1)}
    model.set_eval_stream(0)
    first = float(model(ids).stats["mean_iters"])
    model.set_eval_stream(1)
    second = float(model(ids).stats["mean_iters"])
    two = evaluate(model, [batch, batch])
    assert two["mean_iters"] == pytest.approx((first + second) / 2, abs=1e-9)


# -- AdaPonderLM from a PonderLM checkpoint -----------------------------------------------
def test_adaponderlm_from_ponderlm_keeps_its_function():
    ponder = tiny("ponderlm", steps=3, seed=4).eval()
    ids, _ = real_batch(2, 16)
    ref = ponder(ids).logits
    spread = ref.std().item()

    def ada_from_ponderlm(**kw):
        model = tiny("adaponderlm", steps=3, seed=9, **kw).eval()
        missing, unexpected = model.load_state_dict(ponder.state_dict(), strict=False)
        assert not unexpected and set(missing) == set(model.extra_parameter_names())
        return model

    opened = ada_from_ponderlm()
    assert preserve_loaded_function(opened, "ponderlm")
    gap = (opened(ids).logits - ref).abs().max().item()
    assert gap < 2e-3 * spread          # tol = 1e-3 of the pondering update
    legacy = ada_from_ponderlm(gate_preserve_tol=None)
    assert not preserve_loaded_function(legacy, "ponderlm")
    assert (legacy(ids).logits - ref).abs().max().item() > 20 * gap   # s ~ 0.88 changed it
    assert not preserve_loaded_function(ada_from_ponderlm(), "vanilla")


@pytest.mark.parametrize("family", ["ponderlm2", "ponderlm3"])
def test_jacobi_prefill_equals_sequential_prefill(family):
    """The official inference path (parallel prompt prefill) fills the same cache as the
    token-by-token prefill, up to the Jacobi tolerance: later tokens decode the same."""
    from megaponder.infer.decoders import make_decoder

    model = tiny(family, steps=2, seed=2).eval()
    if family == "ponderlm3":
        force_router(model)
    ids, _ = real_batch(1, 14)
    seq = decode_logits(model, ids, chunk=1)
    dec = make_decoder(model, prefill="jacobi")
    got = torch.cat([dec.feed(ids[:, :10])] + [dec.feed(ids[:, t:t + 1]) for t in range(10, 14)], dim=1)
    assert (got - seq).abs().max().item() < 1e-4
    _, ref_decs = decode_logits(model, ids, chunk=1, return_decoders=True)
    assert torch.equal(dec.executed(), ref_decs[0].executed())   # same kept steps per token


def _zero3_exact_eval(rank, world):
    """ZeRO-3, dp=2, PonderLM-2 in eval_mode exact, a different batch per rank: every module
    call is a collective, so the ranks must agree on the number of Jacobi passes."""
    from megaponder.models import build_model as build
    from megaponder.train.engine import build_engine
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import build_topology
    from parallel_checks import family_config

    topo = build_topology(1, 1, False)
    cfg = family_config("ponderlm2", zero=3)
    torch.manual_seed(0)
    engine = build_engine(parallelize(build(cfg), cfg, topo), cfg, topo)
    model = engine.module.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 6 + 4 * rank), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        out = model(ids)
    return out.stats["jacobi_passes"], out.stats["jacobi_residual"]


def test_exact_eval_under_zero3_agrees_on_the_pass_count():
    from dist_utils import run_distributed

    (j0, r0), (j1, r1) = run_distributed(_zero3_exact_eval, world_size=2)
    assert j0 == j1 and r0 == r1 and r0 <= 1e-5
