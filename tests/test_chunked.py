"""The memory-bounded vocabulary ops (megaponder/models/chunked.py) equal the plain ones and
hold less for the backward.

fp32 tolerance 1e-5 (observed ~1e-7): chunking changes only the summation order of the
weight gradients (a sum over chunks of partial products)."""
import pytest
import torch
import torch.nn.functional as F

from megaponder.config import load_config
from megaponder.models import build_model
from megaponder.models.chunked import (linear_cross_entropy, linear_softmax_matmul,
                                       saved_activation_bytes)

N, D, V = 37, 16, 301


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    w_in = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[[3, 10, 11]] = -100
    return h, w, w_in, t


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_linear_cross_entropy_equals_plain(chunk):
    h, w, _, t = _data()
    plain = F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)
    gp = torch.autograd.grad(plain, (h, w))
    got = linear_cross_entropy(h, w, t, chunk)
    gc = torch.autograd.grad(got, (h, w))
    assert torch.allclose(got, plain, atol=1e-6, rtol=0)
    for a, b in zip(gc, gp):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_linear_softmax_matmul_equals_plain(chunk):
    h, w, w_in, _ = _data(1)
    g_out = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    plain = torch.softmax((h @ w.t()).float(), -1).to(w_in.dtype) @ w_in
    gp = torch.autograd.grad(plain, (h, w, w_in), g_out)
    got = linear_softmax_matmul(h, w, w_in, chunk)
    gc = torch.autograd.grad(got, (h, w, w_in), g_out)
    assert torch.allclose(got, plain, atol=1e-6, rtol=0)
    for a, b in zip(gc, gp):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_bf16_chunked_matches_plain_bf16():
    """In bf16 both paths round logits to bf16 and the probabilities' gradient to bf16 before
    the matmuls; what may differ is the fp32 accumulation order of the weight gradient, then
    rounded once to bf16: within 2 bf16 ulps (2^-7 relative) of the largest entry."""
    h, w, _, t = _data(3)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    plain = F.cross_entropy((hb @ wb.t()).float(), t, ignore_index=-100)
    gp = torch.autograd.grad(plain, (hb, wb))
    got = linear_cross_entropy(hb, wb, t, 8)
    gc = torch.autograd.grad(got, (hb, wb))
    assert abs(got.item() - plain.item()) <= 1e-5 and got.dtype == torch.float32
    for a, b in zip(gc, gp):
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * b.float().abs().max()


@pytest.mark.parametrize("family", ["vanilla", "adaponderlm"])
def test_model_chunked_equal_and_holds_less(family, tmp_path):
    """Whole training forward+backward of a family with model.loss_chunk_size vs without:
    same loss and gradients; the tensors autograd saves (the activation peak, parameters
    excluded) shrink by the [tokens, vocab] logits and probabilities of every pass."""
    def run(chunk):
        cfg = load_config(None, [f"model.family={family}", "model.vocab_size=4000",
                                 "model.hidden_size=32", "model.num_heads=2", "ponder.steps=3",
                                 f"model.loss_chunk_size={chunk}"], check_paths=False)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        ids = torch.randint(0, 4000, (2, 33), generator=torch.Generator().manual_seed(1))
        out, saved = saved_activation_bytes(lambda: model(ids[:, :-1], targets=ids[:, 1:]),
                                            exclude=list(model.parameters()))
        out.loss.backward()
        return out, saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_saved, plain_grads = run(0)
    chunked, chunked_saved, chunked_grads = run(16)
    assert chunked.logits is None and plain.logits is not None
    assert torch.allclose(chunked.loss, plain.loss, atol=1e-5, rtol=0)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, g in plain_grads.items():
        assert torch.allclose(chunked_grads[name], g, atol=1e-5, rtol=0), name
    # vanilla: one [64, 4096] fp32 logits (+ its CE copy) gone; adaponderlm: also 3 passes' probs
    assert chunked_saved < 0.6 * plain_saved, (chunked_saved, plain_saved)
