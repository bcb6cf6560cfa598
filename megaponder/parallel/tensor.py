"""Megatron-style tensor parallelism: column/row/vocab-parallel layers, vocab-parallel
cross-entropy, the vocab-parallel pondering embedding, and sequence parallelism.

Conventions: activations are ``[batch, seq, features]``. Without sequence parallelism the
residual stream is replicated on every TP rank; with it the residual stream (LayerNorm and
dropout regions) is split along ``seq`` (dim 1), gathered before column-parallel layers and
reduce-scattered after row-parallel ones (Korthikanti et al. 2022).

Every collective here is a no-op when the group is None or has one member, so the same
code runs in one process. ``COMM`` counts bytes per collective kind (benchmarks).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100

#: bytes handed to each collective kind, per process (see benchmarks/bench_comm_volume.py).
COMM: dict = defaultdict(int)


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _count(kind: str, t: torch.Tensor) -> None:
    COMM[kind] += t.numel() * t.element_size()


# --------------------------------------------------------------------------- raw collectives
def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    _count("tp_all_reduce", x)
    dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    _count("tp_all_gather", x)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: size {x.shape[dim]} of dim {dim} not divisible by {n}")
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    _count("tp_reduce_scatter", x)
    dist.reduce_scatter(out, chunks, group=group)
    return out


def split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


# --------------------------------------------------------------------------- autograd pieces
class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward (entering a TP region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (leaving a TP region)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along ``dim`` forward, keep own chunk backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.group, ctx.dim), None, None


class _ScatterToTP(torch.autograd.Function):
    """Keep own chunk forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Sequence parallel: reduce-scatter along seq forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, 1), None


def copy_to_tp(x, group):
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x, group, dim=-1):
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group, dim)


def scatter_to_tp(x, group, dim=-1):
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group, dim)


def reduce_scatter_seq(x, group):
    return x if _size(group) == 1 else _ReduceScatterSeq.apply(x, group)


# --------------------------------------------------------------------------- layers
def _mark(p: nn.Parameter, dim: int, group) -> nn.Parameter:
    """Record that ``p`` is split over ``group`` (the TP group; for the embedding and head
    possibly the tp x pp group) along ``dim``, in contiguous chunks in group-rank order.
    (DeepSpeed's ``tensor_model_parallel`` flag is set later by parallelize, which knows
    whether this rank's copy counts towards the gradient norm.)"""
    p.tp_sharded = True
    p.partition_dim = dim
    p.shard_group = group
    return p


def _chunk(t: torch.Tensor, n: int, r: int, dim: int) -> torch.Tensor:
    return t.detach().chunk(n, dim=dim)[r].clone()


class _SequenceGatheredLinear(torch.autograd.Function):
    """Sequence-parallel input to a column-parallel matmul: y = all_gather_seq(x) W^T + b.
    Only the local sequence shard of x is kept for the backward, which all-gathers it again
    for the weight gradient (Megatron's trade: one more all-gather instead of holding the
    full-sequence input of every such layer); the input gradient is reduce-scattered."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(all_gather(x, group, 1), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        full = all_gather(x, ctx.group, 1)
        grad_x = reduce_scatter(g.matmul(weight), ctx.group, 1)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; output stays split (gather_output=False).
    Under sequence parallelism x arrives as a sequence shard and is gathered here."""

    def __init__(self, full: nn.Linear, group, sequence_parallel: bool = False,
                 gather_output: bool = False):
        super().__init__()
        n, r = _size(group), _rank(group)
        self.group, self.sequence_parallel, self.gather_output = group, sequence_parallel, gather_output
        self.in_features, self.out_features = full.in_features, full.out_features // n
        self.weight = _mark(nn.Parameter(_chunk(full.weight, n, r, 0)), 0, group)
        self.bias = None if full.bias is None else _mark(nn.Parameter(_chunk(full.bias, n, r, 0)), 0, group)

    def forward(self, x):
        if self.sequence_parallel and _size(self.group) > 1:
            y = _SequenceGatheredLinear.apply(x, self.weight, self.bias, self.group)
        else:
            y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; input arrives split, partial sums are
    all-reduced (or reduce-scattered along seq under sequence parallelism); bias added once."""

    def __init__(self, full: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__()
        n, r = _size(group), _rank(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = full.in_features // n, full.out_features
        self.weight = _mark(nn.Parameter(_chunk(full.weight, n, r, 1)), 1, group)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_seq(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with rows (vocabulary) split over TP: each rank looks up the ids in its
    range, zeros elsewhere, and the partial results are summed (all-reduce, or
    reduce-scatter along seq under sequence parallelism)."""

    def __init__(self, full: nn.Embedding, group, sequence_parallel: bool = False):
        super().__init__()
        n, r = _size(group), _rank(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.per_rank = full.num_embeddings // n
        self.start = r * self.per_rank
        self.weight = _mark(nn.Parameter(_chunk(full.weight, n, r, 0)), 0, group)

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.group)
        return reduce_from_tp(out, self.group)


# --------------------------------------------------------------------------- vocab-parallel ops
class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy over vocab-split logits [N, V/tp]; three [N]-sized
    all-reduces (max, target logit, sum of exp), never the full logits."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        logits = logits.float()
        vmax = all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        shifted = logits - vmax.unsqueeze(-1)
        v_local = logits.shape[-1]
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < v_local)
        idx = local_t.clamp(0, v_local - 1)
        target_logit = torch.gather(shifted, -1, idx.unsqueeze(-1)).squeeze(-1) * mine
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        both = all_reduce(torch.stack([target_logit, sum_exp]), group)
        loss = sum_exp.new_zeros(()) + both[1].log() - both[0]
        softmax = exp / both[1].unsqueeze(-1)
        ctx.save_for_backward(softmax, idx, mine)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, idx, mine = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, group,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token CE over non-ignored targets, logits split over the vocabulary
    (rank r holds columns [r*V/tp, (r+1)*V/tp)). Equals ``lm_cross_entropy`` on the full
    logits (fp32)."""
    v_local = local_logits.shape[-1]
    flat = local_logits.reshape(-1, v_local)
    t = targets.reshape(-1)
    keep = t != ignore_index
    per_token = _VocabParallelCE.apply(flat, t.masked_fill(~keep, 0), _rank(group) * v_local, group)
    per_token = per_token * keep
    return per_token.sum() / keep.sum().clamp(min=1)


def vocab_parallel_ponder_embedding(local_logits: torch.Tensor, local_embed: torch.Tensor,
                                    group, sequence_parallel: bool = False) -> torch.Tensor:
    """softmax(logits) @ W_in with both split over the vocabulary.

    Rank r computes u_r = exp(l_r - m) @ W_r and s_r = sum exp(l_r - m) with the global max m
    (one [N]-sized max all-reduce, no gradient), then [u | s] is summed by ONE all-reduce of
    d+1 values per token and the result is u / s. The full-vocabulary softmax never exists on
    one rank. Under sequence parallelism the sum is a reduce-scatter along seq instead."""
    # softmax in at least fp32 (bf16 logits are upcast), in the logits' dtype if wider
    logits = local_logits.float() if local_logits.element_size() < 4 else local_logits
    with torch.no_grad():
        m = all_reduce(logits.max(dim=-1, keepdim=True).values, group, op=dist.ReduceOp.MAX)
    e = (logits - m).exp()
    u = e.to(local_embed.dtype) @ local_embed
    both = torch.cat([u.to(e.dtype), e.sum(-1, keepdim=True)], dim=-1)
    if sequence_parallel:
        both = reduce_scatter_seq(both, group)
    else:
        both = reduce_from_tp(both, group)
    return (both[..., :-1] / both[..., -1:]).to(local_embed.dtype)


def gather_logits(local_logits: torch.Tensor, group) -> torch.Tensor:
    """Full-vocabulary logits from vocab-split ones (evaluation / tests only)."""
    return gather_from_tp(local_logits, group, -1)


def register_sequence_parallel_grad_sync(params, group) -> list:
    """Under sequence parallelism a TP-replicated parameter used on a sequence shard (LayerNorm,
    row-parallel bias, gates) gets only its shard's gradient: sum it over TP with a hook that
    runs before the gradient is accumulated (so DeepSpeed's ZeRO hooks see the full one)."""
    handles = []
    if _size(group) == 1:
        return handles
    for p in params:
        handles.append(p.register_hook(lambda g, _grp=group: all_reduce(g.clone(), _grp)))
        p.sequence_parallel = True
    return handles
