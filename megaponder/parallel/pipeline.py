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

Schedule. Each stack call is one custom autograd function whose backward walks the stages in
reverse with explicit send/recv, so forward and backward are exactly the single-process math
(the tests check 5 optimizer steps to 1e-5). Micro-batches (gradient accumulation) run one
after another: this is a *correct, simple* schedule with a bubble of (P-1)/P, not 1F1B; see
docs/parallelism.md for why and what an overlapped schedule needs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.attention import AttentionSpec
from .state import Topology
from .tensor import COMM


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _send(t: torch.Tensor, dst: int) -> None:
    COMM["pp_send"] += t.numel() * t.element_size()
    dist.send(t.contiguous(), dst)


def _recv(like: torch.Tensor, src: int) -> torch.Tensor:
    buf = torch.empty_like(like)
    dist.recv(buf, src)
    return buf


def _broadcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    t = t.contiguous()
    COMM["pp_broadcast"] += t.numel() * t.element_size()
    dist.broadcast(t, src, group=group)
    return t


_SPEC_TENSORS = ("q_index", "key_padding_mask", "segment_ids", "key_bias")


def _late_kv_grad(grad):
    raise RuntimeError("pipeline: a gradient for reused K/V arrived after the backward of the "
                       "iteration that produced them; this family's iterations are not ordered "
                       "through their outputs (report this: the K/V gradient would be lost)")


class _LoopedStageFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stack: "PipelinedStack", position_ids, spec_meta, kv_hook, need_grad,
                anchor, x_in, *spec_vals):
        topo = stack.topo
        spec = AttentionSpec(causal=spec_meta)
        inner_spec_vals = []
        for name, v in zip(_SPEC_TENSORS, spec_vals):
            if v is not None and v.is_floating_point() and v.requires_grad:
                v = v.detach().requires_grad_()
            inner_spec_vals.append(v)
            setattr(spec, name, v)
        prev = topo.pp_ranks[topo.pp_rank - 1] if not topo.is_first_stage else None
        nxt = topo.pp_ranks[topo.pp_rank + 1] if not topo.is_last_stage else None
        x = x_in.detach() if topo.is_first_stage else _recv(x_in, prev)
        x.requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            y, kvs = stack.run_local(x, position_ids, spec, kv_hook)
        if nxt is not None:
            _send(y.detach(), nxt)
            out = torch.empty_like(x_in)
        else:
            out = y.detach()
        out = _broadcast(out, topo.pp_ranks[-1], topo.pp_group)
        # K/V for the family's next iteration: leaves whose .grad the next iteration's
        # backward fills; backward() below feeds it into this iteration's graph.
        kv_pairs, handed = [], {}
        for i, kv in kvs.items():
            if kv is None:
                continue
            pair = []
            for t in kv:
                if need_grad and t.requires_grad:
                    leaf = t.detach().requires_grad_()
                    kv_pairs.append((t, leaf))
                else:
                    leaf = t.detach()
                pair.append(leaf)
            handed[i] = tuple(pair)
        ctx.stack, ctx.x, ctx.y = stack, x, y
        ctx.spec_vals = inner_spec_vals
        ctx.kv_pairs = kv_pairs
        stack._last_kvs = handed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        topo = ctx.stack.topo
        prev = topo.pp_ranks[topo.pp_rank - 1] if not topo.is_first_stage else None
        nxt = topo.pp_ranks[topo.pp_rank + 1] if not topo.is_last_stage else None
        g = grad_out.contiguous() if nxt is None else _recv(ctx.y, nxt)
        x, y = ctx.x, ctx.y
        outs, grads = [y], [g]
        for inner, leaf in ctx.kv_pairs:
            if leaf.grad is not None:     # the next iteration attended to these K/V
                outs.append(inner)
                grads.append(leaf.grad)
            leaf.grad = None
            leaf.register_hook(_late_kv_grad)
        torch.autograd.backward(outs, grads)
        gx = x.grad if x.grad is not None else torch.zeros_like(x)
        if prev is not None:
            _send(gx, prev)
            gx = torch.empty_like(gx)
        gx = _broadcast(gx, topo.pp_ranks[0], topo.pp_group)
        spec_grads = []
        for v in ctx.spec_vals:
            if v is not None and v.is_floating_point() and v.requires_grad:
                gv = v.grad if v.grad is not None else torch.zeros_like(v)
                dist.all_reduce(gv, group=topo.pp_group)
                spec_grads.append(gv)
            else:
                spec_grads.append(None)
        ctx.x = ctx.y = ctx.spec_vals = ctx.kv_pairs = None
        return (None, None, None, None, None, None, gx, *spec_grads)


class PipelinedStack(nn.Module):
    """This pipeline rank's share of a NeoXStack (see the module docstring)."""

    def __init__(self, stack: nn.Module, topo: Topology):
        super().__init__()
        self.topo = topo
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

    def run_local(self, x, position_ids, spec, kv_hook):
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
