"""Memory-bounded vocabulary-sized ops: the head + cross entropy and the head + pondering
softmax, computed over chunks of tokens so no [tokens, vocab] tensor is kept for backward.

Why: with Pythia's 50k vocabulary every pondering pass holds its logits (bf16) and their
softmax (fp32) for the backward, and the final cross entropy an fp32 copy of the logits: at
seq 2048 x micro-batch 8 that is ~3.3 GB *per pass*, the memory peak of the pondering
families. Here each chunk's logits live only inside the forward loop and are recomputed in
the backward (one extra head matmul per use: ~2·V·d FLOPs per token, the price of the
memory). Enabled by ``model.loss_chunk_size`` (tokens per chunk; 0 keeps the plain ops).

Both functions equal the plain composition (``F.cross_entropy(logits.float())`` and
``softmax(logits.float()).to(W.dtype) @ W``) in value and gradient up to summation order
(tests/test_chunked.py); they round where the plain path rounds (logits in the weights'
dtype, softmax and loss in fp32, probabilities cast to the weights' dtype before P·W).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        picked = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        for s, e in _chunks(n, chunk):
            logits = (hidden[s:e] @ weight.t()).float()
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            picked[s:e] = logits.gather(1, safe[s:e, None])[:, 0]
        count = valid.sum()
        loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum() / count
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        scale = (grad.float() / count).to(torch.float32)
        for s, e in _chunks(hidden.shape[0], ctx.chunk):
            h = hidden[s:e]
            logits = (h @ weight.t()).float()
            g = torch.exp(logits - lse[s:e, None])
            g.scatter_add_(1, safe[s:e, None], -torch.ones(e - s, 1, device=g.device))
            g = (g * (valid[s:e, None] * scale)).to(hidden.dtype)   # d loss / d logits
            if grad_h is not None:
                grad_h[s:e] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


class _LinearSoftmaxMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, w_out, w_in, chunk: int):
        out = torch.empty(hidden.shape[0], w_in.shape[1], dtype=w_in.dtype, device=hidden.device)
        for s, e in _chunks(hidden.shape[0], chunk):
            probs = torch.softmax((hidden[s:e] @ w_out.t()).float(), dim=-1)
            out[s:e] = probs.to(w_in.dtype) @ w_in
        ctx.save_for_backward(hidden, w_out, w_in)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, w_out, w_in = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_wo = torch.zeros(w_out.shape, dtype=torch.float32, device=w_out.device) \
            if ctx.needs_input_grad[1] else None
        grad_wi = torch.zeros(w_in.shape, dtype=torch.float32, device=w_in.device) \
            if ctx.needs_input_grad[2] else None
        for s, e in _chunks(hidden.shape[0], ctx.chunk):
            h, g = hidden[s:e], grad[s:e].to(w_in.dtype)
            probs = torch.softmax((h @ w_out.t()).float(), dim=-1)
            if grad_wi is not None:
                grad_wi += (probs.to(w_in.dtype).t() @ g).float()
            gp = (g @ w_in.t()).float()                                   # d / d probs
            gl = (probs * (gp - (probs * gp).sum(-1, keepdim=True))).to(hidden.dtype)  # d / d logits
            if grad_h is not None:
                grad_h[s:e] = gl @ w_out
            if grad_wo is not None:
                grad_wo += (gl.t() @ h).float()
        return (grad_h, None if grad_wo is None else grad_wo.to(w_out.dtype),
                None if grad_wi is None else grad_wi.to(w_in.dtype), None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """mean CE of ``hidden @ weight.T`` (fp32) over non-ignored targets; hidden [..., d]."""
    d = hidden.shape[-1]
    return _LinearCrossEntropy.apply(hidden.reshape(-1, d), weight, targets.reshape(-1), int(chunk))


def linear_softmax_matmul(hidden: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """``softmax(hidden @ w_out.T, fp32).to(w_in.dtype) @ w_in``, shaped like hidden."""
    d = hidden.shape[-1]
    out = _LinearSoftmaxMatmul.apply(hidden.reshape(-1, d), w_out, w_in, int(chunk))
    return out.view(*hidden.shape[:-1], w_in.shape[1])


def saved_activation_bytes(fn, exclude=()) -> tuple[object, int]:
    """Run ``fn()`` and return (its result, bytes of the tensors autograd saved for backward,
    each storage counted once, those of ``exclude`` — e.g. the parameters — left out): the
    activation memory a training step holds at its peak, measured alike on CPU and GPU."""
    seen: dict = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        except (RuntimeError, NotImplementedError):   # tensors without storage (wrapper subclasses)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
