"""Every pondering family under every parallel layout, against the single-process model.

Families: ponderlm, adaponderlm, ponderlm2, ponderlm3, loop, pause, fixed_pruning,
random_halting (tiny: d=32, 2 layers, 4 heads, vocab 128, seq 8, micro-batch 2, 2 micro-batches
per step; settings in tests/parallel_checks.py FAMILY_PONDER make every recurrent feature act:
halting happens, Jacobi counts differ between micro-batches, the bottom-k and compute losses
are on). Layouts: tp2 ZeRO-1, pp2 ZeRO-1, dp2 ZeRO-1/2/3 (one 2-process spawn) and tp2 x pp2
ZeRO-1 (one 4-process spawn); the 2-process spawn also runs tp2 with activation checkpointing
and a tp2 bf16 run. AdaPonderLM under pp keeps ``kv_reuse_grad=true``: the gradient through
reused K/V is routed inside the looped pipeline (megaponder/parallel/pipeline.py).

Tolerances (fp32, 5 DeepSpeed AdamW steps, lr 1e-2, clipping at 0.5 active):
  * losses and gradient norms: 1e-5 relative (the issue's bar; observed <= ~5e-7);
  * final weights: 1e-5 relative L2 over all parameters and 2e-4 absolute per element. Adam
    divides by sqrt(v): an entry whose gradient sits at rounding level (a q/k bias, a gate
    bias whose gradient nearly cancels) moves by a different fraction of an lr-sized step
    under any other summation order (observed up to ~8e-5 absolute, ~5e-6 relative L2);
  * bf16 (tp2 ZeRO-1, 3 steps on one repeated batch, DeepSpeed's bf16 with fp32 master
    weights and fp32 gradient accumulation): finite, the loss falls by > 30%, the first loss
    (forward only, identical weights) within 1e-2 relative of fp32 (bf16 keeps 8 mantissa
    bits, unit roundoff 2^-8 = 3.9e-3; observed 1e-4), and every later loss within 6e-2
    (observed <= 3.3%): Adam turns gradient roundoff into lr-sized steps, so after the first
    update the two runs walk apart by more than the forward roundoff.
"""
import pytest
import torch

from dist_utils import run_distributed
from parallel_checks import FAMILIES, run_family_checks

LAYOUTS_2 = [("tp2_z1", 2, 1, 1), ("pp2_z1", 1, 2, 1), ("dp2_z1", 1, 1, 1),
             ("dp2_z2", 1, 1, 2), ("dp2_z3", 1, 1, 3)]
#: (name, tp, pp, zero, families, config overrides)
EXTRA_2 = [("tp2_ckpt", 2, 1, 1, ["vanilla", "ponderlm", "adaponderlm", "ponderlm3"],
            {"parallel.activation_checkpointing": "layer"}),
           # per-iteration recompute of the rank's own stage inside the looped pipeline, with
           # K/V reuse (adaponderlm) and Jacobi passes over latent thoughts (ponderlm2)
           ("pp2_ckpt_iter", 1, 2, 1, ["vanilla", "adaponderlm", "ponderlm2"],
            {"parallel.activation_checkpointing": "iteration"}),
           # the chunked pipeline schedule with uneven row chunks (3 rows in 2 chunks), with
           # K/V-reuse gradients (adaponderlm) and a key-bias gradient (ponderlm3) sliced per
           # chunk; and the unchunked schedule
           ("pp2_chunks_uneven", 1, 2, 1, ["adaponderlm", "ponderlm3"],
            {"train.micro_batch_size": 3, "parallel.pipeline_chunks": 2}),
           ("pp2_chunks1", 1, 2, 1, ["adaponderlm"], {"parallel.pipeline_chunks": 1}),
           # embedding and head split over the pipeline ranks too
           ("pp2_vocab_over_pp", 1, 2, 1, FAMILIES, {"parallel.shard_vocab_over_pp": True}),
           # sequence parallelism inside the stack (the vertical pondering families)
           ("tp2_sp", 2, 1, 1, ["ponderlm", "adaponderlm", "fixed_pruning", "random_halting"],
            {"parallel.sequence_parallel": True})]
# ZeRO-0 for every family, and AdaPonderLM with training-time compaction (dense parity and
# host syncs per step, test_host_syncs_per_optimizer_step)
EXTRA_2 += [("dp2_z0", 1, 1, 0, ["vanilla"] + FAMILIES, {}),
            ("dp2_z1_compact", 1, 1, 1, ["adaponderlm"], {"ponder.train_compaction": True})]
# LLaMA backbone with grouped-query attention (4 query heads, 2 kv heads: under tp2 each
# rank holds 1 kv head and its 2 query heads), same tolerances as GPT-NeoX
LLAMA = {"model.backbone": "llama", "model.num_kv_heads": 2}
LLAMA_FAMILIES = ["vanilla", "adaponderlm", "ponderlm3"]
EXTRA_2 += [(f"llama_{name}", tp, pp, zero, LLAMA_FAMILIES, LLAMA)
            for name, tp, pp, zero in (("tp2_z1", 2, 1, 1), ("pp2_z1", 1, 2, 1),
                                       ("dp2_z1", 1, 1, 1), ("dp2_z3", 1, 1, 3))]
EXTRA_4 = [("tp2_pp2_vocab_over_pp", 2, 2, 1, ["vanilla", "adaponderlm", "ponderlm3"],
            {"parallel.shard_vocab_over_pp": True}),
           ("tp2_pp2_sp", 2, 2, 1, ["adaponderlm"], {"parallel.sequence_parallel": True}),
           ("llama_tp2_pp2_z1", 2, 2, 1, ["adaponderlm"], LLAMA)]
BF16_FAMILIES = ["vanilla", "ponderlm"]
LAYOUTS_4 = [("tp2_pp2_z1", 2, 2, 1)]
HALTING = ("adaponderlm", "fixed_pruning", "random_halting")

_cache = {}


def _results(world):
    if world not in _cache:
        if world == 2:
            args = (LAYOUTS_2, None, 5, EXTRA_2, BF16_FAMILIES)
        else:
            args = (LAYOUTS_4, None, 5, EXTRA_4, [])
        _cache[world] = run_distributed(run_family_checks, world, args, timeout=1200)
    return _cache[world]


def _check(res, rank0, family, weight_rtol=1e-5, weight_atol=2e-4):
    assert "error" not in res, res["error"]
    for a, b in zip(res["losses"], res["ref_losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (res["losses"], res["ref_losses"])
    for a, b in res["norms"]:
        assert abs(a - b) <= 1e-5 * abs(b), res["norms"]
    assert len(res["losses"]) >= 5
    assert res.get("keys") is None, res["keys"]   # the wrappers kept the single-device names
    if family in HALTING:  # halting really happened, so K/V reuse was exercised
        assert res["mean_iters"] < res["passes"] - 0.05, res["mean_iters"]
    if rank0:
        assert res["weights_rel_l2"] < weight_rtol, res
        assert res["weights_max_abs"] < weight_atol, res
        if "roundtrip_abs" in res:
            assert res["roundtrip_abs"] == 0.0, res


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", [lay[0] for lay in LAYOUTS_2])
def test_family_two_processes(layout, family):
    for rank, per_rank in enumerate(_results(2)):
        _check(per_rank[layout][family], rank == 0, family)


@pytest.mark.parametrize("world,layout,family", [(w, lay[0], fam) for w, extra in ((2, EXTRA_2), (4, EXTRA_4))
                                                  for lay in extra for fam in lay[4]])
def test_extra_layouts(world, layout, family):
    """Checkpointing (per layer under tp2, per iteration under pp2), pipeline chunking variants
    and the vocabulary split over pp vs the single process without them."""
    overrides = next(lay[5] for lay in EXTRA_2 + EXTRA_4 if lay[0] == layout)
    # With the vocabulary split over 4 ranks, every vocab-parallel sum (softmax, CE,
    # pondering embedding) adds 4 partial sums in another order; Adam scales each coordinate's
    # step to ~lr whatever its gradient's size, so rounding in small gradients becomes
    # lr-sized weight differences (observed 1.6e-5 rel L2 / 3.3e-4 abs after 5 steps for
    # adaponderlm, 6.4e-6 / 1.3e-4 without the split). Losses stay within 1e-5 at every step.
    tol = {"weight_rtol": 5e-5, "weight_atol": 1e-3} if layout == "tp2_pp2_vocab_over_pp" else {}
    if layout.startswith("llama_tp2"):
        # the same Adam effect under tp2 on llama: since the llama init has no depth factor
        # (as the published Llama code) the weights are larger and AdaPonderLM measured 1.8e-5
        # rel L2 / 3.5e-4 abs after 5 steps (losses still within 1e-5 at every step)
        tol = {"weight_rtol": 5e-5, "weight_atol": 1e-3}
    for rank, per_rank in enumerate(_results(world)):
        res = per_rank[layout][family]
        _check(res, rank == 0, family, **tol)
        if "parallel.activation_checkpointing" in overrides:
            assert res["checkpointing"] == [overrides["parallel.activation_checkpointing"]]


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_tp2_trains(family):
    for per_rank in _results(2):
        res = per_rank["bf16_tp2"][family]
        assert "error" not in res, res["error"]
        bf, fp = res["bf16_losses"], res["fp32_losses"]
        assert all(torch.isfinite(torch.tensor(bf))), bf
        assert bf[-1] < 0.7 * bf[0], bf                      # it trains (fp32: -45%)
        assert abs(bf[0] - fp[0]) <= 1e-2 * abs(fp[0]), (bf, fp)  # forward roundoff only
        for a, b in zip(bf, fp):
            assert abs(a - b) <= 6e-2 * abs(b), (bf, fp)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tp2_pp2_four_processes(family):
    for rank, per_rank in enumerate(_results(4)):
        _check(per_rank["tp2_pp2_z1"][family], rank == 0, family)


@pytest.mark.parametrize("granularity", ["layer", "iteration"])
@pytest.mark.parametrize("family", ["vanilla"] + FAMILIES)
def test_activation_checkpointing_single_process(family, granularity):
    """Same loss and gradients with activation checkpointing (one process)."""
    import copy

    from megaponder.models import build_model
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import Topology
    from parallel_checks import family_config
    cfg = family_config(family)
    torch.manual_seed(0)
    ref = build_model(cfg)
    cfg.parallel.activation_checkpointing = granularity
    ck = parallelize(copy.deepcopy(ref), cfg, Topology())
    # a wrapper module, not a re-bound forward: print(model) shows what runs
    assert not [n for n, m in ck.named_modules() if "forward" in vars(m)]
    assert "Checkpointed(" in repr(ck) and f"granularity={granularity}" in repr(ck)
    assert list(ck.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    tgt = torch.randint(0, 128, (2, 8), generator=g)
    for m in (ref, ck):
        m.set_step(0)
    calls, mlp = [], ck.stack.layers[0].mlp
    mlp_forward = mlp.forward   # counted directly: module hooks do not fire in the recompute

    def counted(*args, **kwargs):
        calls.append(1)
        return mlp_forward(*args, **kwargs)
    mlp.forward = counted
    a, b = ref(ids, targets=tgt).loss, ck(ids, targets=tgt).loss
    forward_calls = len(calls)
    a.backward()
    b.backward()
    assert len(calls) > forward_calls, "backward recomputed nothing: checkpointing is not active"
    assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())
    named = dict(ck.named_parameters())
    for n, p in ref.named_parameters():
        if p.grad is None:
            assert named[n].grad is None
            continue
        assert torch.allclose(named[n].grad, p.grad, rtol=1e-5, atol=1e-7), n


def test_adaponderlm_kv_reuse_gradient_matters():
    """The pp parity above uses kv_reuse_grad=true in both runs; make sure that setting
    changes the gradient with the test's halting settings (else the check would be vacuous)."""
    from megaponder.models import build_model
    from parallel_checks import family_config
    grads = []
    for flag in (True, False):
        cfg = family_config("adaponderlm", kv_reuse_grad=flag)
        torch.manual_seed(0)
        m = build_model(cfg)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, 128, (2, 8), generator=g)
        tgt = torch.randint(0, 128, (2, 8), generator=g)
        m.set_step(0)
        m(ids, targets=tgt).loss.backward()
        grads.append(m.stack.layers[0].attn.qkv.weight.grad.clone())
    rel = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert rel > 1e-3, rel


#: Host reads ("syncs", tests/sync_count.py) per optimizer step of a step that logs, evaluates
#: and saves nothing: megaponder's own are the skip decision and the stop check (each one
#: all-reduce then one read); its losses, statistics, FLOPs and gradient norm stay on the
#: device until a logging step reads them all at once.
MEGAPONDER_SYNCS = 2
#: DeepSpeed's own, inside engine.step() (DeepSpeed 0.18): ZeRO-1/2 check the reduced
#: gradient norm on the host three times (overflow check, clip-norm validity, norm of norm
#: groups), ZeRO-3 once; ZeRO-0 (megaponder computes the norm) none. Beyond megaponder's
#: reach without patching DeepSpeed's step; asserted so that a DeepSpeed upgrade or a change
#: of the engine config that adds reads shows up here.
DEEPSPEED_SYNCS = {0: 0, 1: 3, 2: 3, 3: 1}
#: Under ZeRO-3 a change of the module call order (a new Jacobi count of PonderLM-2/3 draws
#: 1 or 2 passes here) makes DeepSpeed re-record its parameter trace, with a host read per
#: traced parameter in its cross-rank consistency checks: hundreds of reads on such steps.
ZERO3_RETRACE = ("ponderlm2", "ponderlm3")


def _sync_cases():
    for world, layouts, extra in ((2, LAYOUTS_2, EXTRA_2), (4, LAYOUTS_4, EXTRA_4)):
        for name, tp, pp, zero in layouts:
            for family in FAMILIES:
                yield world, name, zero, family, {}
        for name, tp, pp, zero, families, overrides in extra:
            for family in families:
                yield world, name, zero, family, overrides


@pytest.mark.parametrize("world,layout,zero,family,overrides",
                         [pytest.param(*case, id=f"{case[1]}-{case[3]}") for case in _sync_cases()])
def test_host_syncs_per_optimizer_step(world, layout, zero, family, overrides):
    """<= 2 host reads per step from megaponder for every family and layout (ZeRO 0-3, tp2,
    pp2, tp2 x pp2), plus one per compacted pass with ponder.train_compaction (its shapes are
    the active counts: that read is what compaction costs), and DeepSpeed's own. The first
    step is left out: it builds DeepSpeed's ZeRO-3 trace and the attention kernel choice."""
    from parallel_checks import FAMILY_PONDER
    budget = MEGAPONDER_SYNCS
    if overrides.get("ponder.train_compaction"):
        budget += FAMILY_PONDER[family]["steps"] * 2   # compacted passes x micro-batches
    for rank, per_rank in enumerate(_results(world)):
        res = per_rank[layout][family]
        assert "error" not in res, res["error"]
        for step, syncs in enumerate(res["syncs"][1:], start=1):
            assert syncs["megaponder"] <= budget, (rank, step, syncs["sites"])
            if not (zero == 3 and family in ZERO3_RETRACE):
                assert syncs["deepspeed"] <= DEEPSPEED_SYNCS[zero], (rank, step, syncs["sites"])
