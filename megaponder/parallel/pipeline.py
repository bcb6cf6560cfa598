"""Looped pipeline parallelism for recurrent (weight-shared) stacks.

Pipeline rank r holds layers [r*L/P, (r+1)*L/P) of the shared stack exactly once. :class:`PipelinedStack` replaces ``model.stack`` and
keeps its signature ``stack(inputs_embeds, position_ids, spec, kv_hook) -> (hidden, kvs)``,
so every family's control flow (K pondering passes, Jacobi passes over latent thoughts,
gates, halting masks) runs unchanged on every pipeline rank: each call of the stack is one
*iteration* that visits ranks 0..P-1 in order (virtual stages r, r+P, r+2P, ... share
weights), and its output is broadcast from the last rank so the family's per-iteration work
(head, pondering embedding, gates, losses) continues on every rank with identical values.
The embedding, head and family extras are therefore replicated over the pipeline group (their
gradients are identical on every pipeline rank, so nothing has to be reduced over pp).

K/V stay on the rank that owns the layer: ``kv_hook`` is called only there, and the
returned ``kvs`` hold this rank's layers' K/V and ``None`` for the others. Gradient through
K/V reused across iterations (AdaPonderLM's KV reuse, the pruning baselines) is routed on the
owning rank, outside the pipeline's send/recv: the K/V handed back to the family are leaves of
the *next* iteration's stage graph; that iteration's backward leaves their gradient in
``.grad``, and the backward of the iteration that produced them (which always runs later: the
next iteration's input depends on this one's output) feeds it into its own graph together with
the output gradient. A hook raises if a K/V gradient ever arrived after its producer's
backward had run (it would otherwise be lost silently).

The final LayerNorm is applied after the broadcast, on every pipeline rank (it is replicated
like the embedding and head), so families that call ``stack(..., apply_final_norm=False)``
and ``stack.final_norm`` themselves (the loop baseline) work unchanged.

Schedule. Each stack call is one custom autograd function. Its rows are split into
``pipeline_chunks`` chunks (``parallel.pipeline_chunks``, capped at the micro-batch size) that
flow through the stages one after another with non-blocking sends and pre-posted receives:
stage r computes chunk i+1 while stage r+1 computes chunk i (GPipe inside one call), and the
backward walks the chunks through the stages in reverse the same way. Per stack call the
bubble is (P-1)/(c+P-1) instead of (P-1)/P. A chunked call holds exactly the activations the
unchunked one holds (a micro-batch's activations live until its backward anyway), so unlike
GPipe across micro-batches it costs no memory. Micro-batches themselves still run one after
another: the family's per-iteration work needs every rank's copy of the previous stack call's
output, so a 1F1B interleave of micro-batches would have to interleave the family code too
(docs/parallelism.md). The layers are row-independent, so chunking changes only the
floating-point blocking of the matmuls (tests: 5 optimizer steps to 1e-5 vs one process).
A ``kv_hook`` is restricted to a chunk through its ``rows(slice)`` method; a hook without one
(a decoder's cache) runs the call unchunked.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.attention import AttentionSpec
from .state import Topology, checkpointed_call
from .tensor import COMM


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _isend(t: torch.Tensor, dst: int):
    t = t.contiguous()
    COMM["pp_send"] += t.numel() * t.element_size()
    return t, dist.isend(t, dst)


def _irecv_chunks(like: torch.Tensor, chunks: list[slice], src: int) -> list:
    """Post one receive per row chunk up front (matched in order: same source, same tag)."""
    out = []
    for sl in chunks:
        buf = torch.empty_like(like[sl])
        out.append((buf, dist.irecv(buf, src)))
    return out


def _broadcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    t = t.contiguous()
    COMM["pp_broadcast"] += t.numel() * t.element_size()
    dist.broadcast(t, src, group=group)
    return t


_SPEC_TENSORS = ("q_index", "key_padding_mask", "segment_ids", "key_bias")


def row_chunks(batch: int, chunks: int) -> list[slice]:
    """``chunks`` contiguous row slices covering [0, batch) (fewer if batch is smaller)."""
    n = max(1, min(chunks, batch))
    bounds = [batch * i // n for i in range(n + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(n)]


def _rows(t, batch: int, sl: slice):
    """The rows ``sl`` of a per-row tensor ([B, ...], at least 2-D); broadcast ones as is."""
    if t is None or not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != batch:
        return t
    return t[sl]


def _late_kv_grad(grad):
    raise RuntimeError("pipeline: a gradient for reused K/V arrived after the backward of the "
                       "iteration that produced them; this family's iterations are not ordered "
                       "through their outputs (report this: the K/V gradient would be lost)")


class _LoopedStageFn(torch.autograd.Function):
    """One stack call on this pipeline rank: its layers over every row chunk, chunk after
    chunk, receiving each from the previous rank and sending it on as soon as it is done."""

    @staticmethod
    def forward(ctx, stack: "PipelinedStack", position_ids, spec_meta, kv_hook, need_grad,
                anchor, x_in, *spec_vals):
        topo = stack.topo
        batch = x_in.shape[0]
        # a hook that cannot be restricted to rows (e.g. a decoder's cache) runs unchunked
        chunks = row_chunks(batch, stack.chunks if kv_hook is None or hasattr(kv_hook, "rows") else 1)
        inner_spec_vals = []
        for v in spec_vals:
            if v is not None and v.is_floating_point() and v.requires_grad:
                v = v.detach().requires_grad_()
            inner_spec_vals.append(v)
        prev = topo.pp_ranks[topo.pp_rank - 1] if not topo.is_first_stage else None
        nxt = topo.pp_ranks[topo.pp_rank + 1] if not topo.is_last_stage else None
        incoming = _irecv_chunks(x_in, chunks, prev) if prev is not None else None
        xs, ys, chunk_kvs, sends = [], [], [], []
        for i, sl in enumerate(chunks):
            if incoming is None:
                x = x_in.detach()[sl].clone()
            else:
                x, work = incoming[i]
                work.wait()
            x.requires_grad_(need_grad)
            # autograd.Function.forward runs under no_grad: the row slices of the spec and of
            # the reused K/V must be taken with grad enabled, or their gradients are lost
            with torch.set_grad_enabled(need_grad):
                spec = AttentionSpec(causal=spec_meta)
                for name, v in zip(_SPEC_TENSORS, inner_spec_vals):
                    setattr(spec, name, _rows(v, batch, sl))
                hook = kv_hook.rows(sl) if (kv_hook is not None and len(chunks) > 1) else kv_hook
                y, kvs = stack.run_local(x, _rows(position_ids, batch, sl), spec, hook)
            if nxt is not None:
                sends.append(_isend(y.detach(), nxt))
            xs.append(x)
            ys.append(y)
            chunk_kvs.append(kvs)
        for _, work in sends:
            work.wait()
        out = torch.cat([y.detach() for y in ys]) if nxt is None else torch.empty_like(x_in)
        out = _broadcast(out, topo.pp_ranks[-1], topo.pp_group)
        # K/V for the family's next iteration: full-batch leaves whose .grad the next
        # iteration's backward fills; backward() below feeds each chunk's rows of it into
        # that chunk's graph.
        kv_pairs, handed = [], {}
        for layer, kv in chunk_kvs[0].items():
            if kv is None:
                continue
            pair = []
            for j in range(len(kv)):
                parts = [kvs[layer][j] for kvs in chunk_kvs]
                whole = torch.cat([t.detach() for t in parts]) if len(parts) > 1 else parts[0].detach()
                if need_grad and parts[0].requires_grad:
                    whole.requires_grad_()
                    kv_pairs.append((parts, whole))
                pair.append(whole)
            handed[layer] = tuple(pair)
        ctx.stack, ctx.chunks, ctx.xs, ctx.ys = stack, chunks, xs, ys
        ctx.spec_vals = inner_spec_vals
        ctx.kv_pairs = kv_pairs
        stack._last_kvs = handed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        topo = ctx.stack.topo
        prev = topo.pp_ranks[topo.pp_rank - 1] if not topo.is_first_stage else None
        nxt = topo.pp_ranks[topo.pp_rank + 1] if not topo.is_last_stage else None
        chunks = ctx.chunks
        incoming = _irecv_chunks(grad_out, chunks, nxt) if nxt is not None else None
        kv_grads = [(parts, leaf.grad) for parts, leaf in ctx.kv_pairs]
        gxs, sends = [], []
        for i, sl in enumerate(chunks):
            if incoming is None:
                g = grad_out[sl].contiguous()
            else:
                g, work = incoming[i]
                work.wait()
            outs, grads = [ctx.ys[i]], [g]
            for parts, kv_grad in kv_grads:
                if kv_grad is not None:   # the next iteration attended to these K/V
                    outs.append(parts[i])
                    grads.append(kv_grad[sl])
            torch.autograd.backward(outs, grads)
            x = ctx.xs[i]
            gx = x.grad if x.grad is not None else torch.zeros_like(x)
            if prev is not None:
                sends.append(_isend(gx, prev))
            gxs.append(gx)
        for _, leaf in ctx.kv_pairs:
            leaf.grad = None
            leaf.register_hook(_late_kv_grad)
        for _, work in sends:
            work.wait()
        gx = torch.cat(gxs) if prev is None else torch.empty_like(grad_out)
        gx = _broadcast(gx, topo.pp_ranks[0], topo.pp_group)
        spec_grads = []
        for v in ctx.spec_vals:
            if v is not None and v.is_floating_point() and v.requires_grad:
                gv = v.grad if v.grad is not None else torch.zeros_like(v)
                dist.all_reduce(gv, group=topo.pp_group)
                spec_grads.append(gv)
            else:
                spec_grads.append(None)
        ctx.xs = ctx.ys = ctx.spec_vals = ctx.kv_pairs = None
        return (None, None, None, None, None, None, gx, *spec_grads)


class PipelinedStack(nn.Module):
    """This pipeline rank's share of a NeoXStack (see the module docstring)."""

    def __init__(self, stack: nn.Module, topo: Topology, chunks: int = 1):
        super().__init__()
        self.topo = topo
        self.chunks = chunks
        n = len(stack.layers)
        self.num_layers = n
        self.owned = list(stage_layers(n, topo.pp, topo.pp_rank))
        # A ModuleDict keyed by the global index keeps the single-device state-dict names
        # ("stack.layers.3.attn.qkv.weight") on whichever rank owns layer 3.
        self.layers = nn.ModuleDict({str(i): stack.layers[i] for i in self.owned})
        # replicated on every pipeline rank, applied after the broadcast (module docstring)
        self.final_norm = stack.final_norm
        self._rotary = stack.layers[self.owned[0]].attn.rotary
        self._last_kvs = None
        self._anchor = torch.zeros((), requires_grad=True)
        self._ckpt = None   # "iteration": run_local recomputed in backward

    def checkpoint_stage(self, granularity: str) -> None:
        """Recompute this rank's own layers (one :meth:`run_local` call) in backward; the
        pipeline's send/recv stay outside the recompute."""
        self._ckpt = granularity

    def extra_repr(self) -> str:
        return f"owned={self.owned}, checkpointed={self._ckpt}" if self._ckpt else f"owned={self.owned}"

    def run_local(self, x, position_ids, spec, kv_hook):
        if self._ckpt:
            return checkpointed_call(self._run_local, x, position_ids, spec, kv_hook)
        return self._run_local(x, position_ids, spec, kv_hook)

    def _run_local(self, x, position_ids, spec, kv_hook):
        cos, sin = self._rotary.cos_sin(position_ids, x.dtype)
        kvs = {}
        for i in self.owned:
            x, kv = self.layers[str(i)](x, cos, sin, spec, kv_hook)
            kvs[i] = kv
        return x, kvs

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                spec: Optional[AttentionSpec] = None, kv_hook=None, apply_final_norm: bool = True):
        spec = spec or AttentionSpec()
        if self.topo.pp == 1:
            hidden, kvs = self.run_local(inputs_embeds, position_ids, spec, kv_hook)
            hidden = self.final_norm(hidden) if apply_final_norm else hidden
            return hidden, [kvs.get(i) for i in range(self.num_layers)]
        vals = [getattr(spec, name) for name in _SPEC_TENSORS]
        need_grad = torch.is_grad_enabled()
        # the anchor makes the output require grad even if no input does (frozen embedding),
        # so this rank's layer parameters still receive gradients
        anchor = self._anchor if need_grad else None
        hidden = _LoopedStageFn.apply(self, position_ids, spec.causal, kv_hook, need_grad, anchor,
                                      inputs_embeds, *vals)
        kvs = self._last_kvs or {}
        self._last_kvs = None
        if apply_final_norm:
            hidden = self.final_norm(hidden)
        return hidden, [kvs.get(i) for i in range(self.num_layers)]
