"""The throughput switches change speed, not results: regional compile of the layers
(model.compile) and torch's fused AdamW (optim.fused), each against the plain path."""
import pytest
import torch

from megaponder.config import load_config
from megaponder.models import build_model
from megaponder.models.compile import compile_layers
from megaponder.train.engine import param_groups


def _model(family, **over):
    sets = [f"model.family={family}", "model.hidden_size=32", "model.num_heads=2",
            "model.vocab_size=512", "ponder.steps=2", "ponder.halting_warmup_end=0"]
    cfg = load_config(None, sets + [f"{k}={v}" for k, v in over.items()], check_paths=False)
    torch.manual_seed(0)
    return build_model(cfg).train()


def test_compiled_layers_equal_eager_with_kv_reuse():
    """AdaPonderLM exercises what regional compile must survive: the same compiled layer
    called once per pass, with and without the KV-reuse hook, gradients through the reused
    K/V. Dynamo + AOT autograd run here with the aot_eager backend (Inductor's C++ build of a
    2-layer model takes ~45 s on 2 cores, too long for the suite; the GPU run compiles with
    Inductor). fp32, 1e-6: the traced graph runs the same ATen ops."""
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    ref_model, comp_model = _model("adaponderlm"), _model("adaponderlm")
    assert compile_layers(comp_model, backend="aot_eager") == 2
    for _ in range(2):   # the second call runs the cached graphs
        ref, got = (m(ids[:, :-1], targets=ids[:, 1:]) for m in (ref_model, comp_model))
        ref.loss.backward()
        got.loss.backward()
        assert torch.allclose(got.loss, ref.loss, atol=1e-6, rtol=0)
        assert got.stats["mean_iters"] == ref.stats["mean_iters"]
        for (name, a), (_, b) in zip(comp_model.named_parameters(), ref_model.named_parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=0), name
    assert [n for n, _ in comp_model.named_parameters()] == [n for n, _ in ref_model.named_parameters()]


def test_fused_adamw_equals_foreach():
    """optim.fused=true hands fused=True to torch's AdamW (build_engine); on CPU torch >= 2.4
    has that kernel too. On the GPT-NeoX decay split, fp32: the first update equal to 1e-6;
    over 3 steps the losses to 1e-4 (Adam divides by sqrt(v), so parameters with
    near-zero gradients turn 1e-9 forward differences into visible ones; the curve stays)."""
    models = [_model("vanilla"), _model("vanilla")]
    opts = [torch.optim.AdamW(param_groups(m, 0.01), lr=1e-2, betas=(0.9, 0.95), fused=fused)
            for m, fused in zip(models, (None, True))]
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        losses = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = m(ids[:, :-1], targets=ids[:, 1:]).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4, (step, losses)
        if step == 0:
            diff = max((a - b).abs().max().item() for a, b in zip(*(m.parameters() for m in models)))
            assert diff <= 1e-6, diff
    assert opts[1].defaults["fused"] is True


def test_torch_range_check():
    import warnings

    from megaponder.models.compat import check_torch, torch_version

    assert torch_version("2.6.0a0+ecf3bae40a") == (2, 6) and torch_version("2.11.0+cu130") == (2, 11)
    assert check_torch(torch.__version__)   # the pinned CI torch is in range
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not check_torch("2.4.1")
    assert "torch >= 2.6" in str(caught[0].message)


@pytest.mark.parametrize("family, over, recompiles", [
    pytest.param("vanilla", {}, 0, id="vanilla"),
    pytest.param("adaponderlm", {}, 0, id="adaponderlm"),
    pytest.param("ponderlm3", {"ponder.jacobi_passes": "[2]"}, 0, id="ponderlm3"),
    # the router warm-up ends after step 0: one new graph (the router trains), by design
    pytest.param("ponderlm3", {"ponder.jacobi_passes": "[2]", "ponder.router_warmup_steps": "1"}, 1,
                 id="ponderlm3+router_warmup"),
])
def test_whole_model_compile_has_no_graph_break_and_equals_eager(family, over, recompiles):
    """model.compile: whole — the whole training forward in one Dynamo graph (set_step draws
    PonderLM-3's Jacobi count outside the forward, the fixed FLOPs ratios are trace-time
    constants), backward by AOT autograd. aot_eager backend (no Inductor C++ build on the CI
    CPU), fp32: the same ATen ops, so losses and gradients to 1e-6 over three steps.

    Compiled once: no recompile as the step number changes (Dynamo guards on every int
    attribute of a module the forward reads; PonderLM-3's router warm-up read
    ``training_step`` and recompiled on every step, under Inductor as under aot_eager: the
    guards come from Dynamo's trace, which the backend does not change, so the cheap backend
    exercises the same failure). Recompiles are Dynamo's compiled-frame count after step 0."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    ref, comp = _model(family, **over), _model(family, **over)
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    for m in (ref, comp):
        m.set_step(0)
    explained = torch._dynamo.explain(lambda x: comp(x[:, :-1], targets=x[:, 1:]).loss)(ids)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    comp.compile(backend="aot_eager")
    for step in range(3):
        for m in (ref, comp):
            m.set_step(step)
            m.zero_grad(set_to_none=True)
        a, b = ref(ids[:, :-1], targets=ids[:, 1:]).loss, comp(ids[:, :-1], targets=ids[:, 1:]).loss
        a.backward()
        b.backward()
        if step == 0:
            frames_after_first = counters["frames"]["ok"]
        assert abs(a.item() - b.item()) <= 1e-6, (step, a.item(), b.item())
        for (name, p), q in zip(ref.named_parameters(), comp.parameters()):
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), name
    assert counters["frames"]["ok"] - frames_after_first == recompiles
