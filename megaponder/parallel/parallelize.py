"""Turn a single-device model from megaponder.models into its tensor/pipeline-parallel form,
and move state dicts between the two.

    topo = init_distributed(tp=2, pp=2)
    model = build_model(cfg)                  # same seed on every rank -> same full weights
    model = parallelize(model, cfg, topo)     # in place: shards TP, drops other stages' layers
    ...
    full = gather_full_state_dict(model, topo)   # on global rank 0; None elsewhere
    load_full_state_dict(model, full_state, topo)  # every rank; the inverse

The model code knows nothing about ranks. What changes:
  * TP: the linears named by the layer class's ``TP_PLAN`` become column- or row-parallel
    (NeoX: ``attn.qkv``/``mlp.fc1`` column, the per-head [q|k|v] row layout making each
    rank's heads one contiguous row block, ``attn.out``/``mlp.fc2`` row; LLaMA: q/k/v and
    gate/up column, split per (kv) head, o/down row), ``embed_in`` a vocab-parallel embedding, ``embed_out`` a column-parallel
    head whose logits stay split over the vocabulary. The model's ``lm_loss`` and
    ``ponder_embedding`` go to its ``vocab_ops`` (:class:`VocabParallelOps`, tensor.py), so
    ``ModelOutput.logits`` holds this rank's vocabulary slice (``gather_logits`` for all).
    The stack and (with dropout) attention run inside :class:`Transparent` wrappers that
    keep every state-dict key of the single-device model.
  * SP (``parallel.sequence_parallel``): LayerNorm/dropout regions work on a 1/tp slice of
    the sequence; replicated parameters there get a TP gradient all-reduce hook.
  * PP: ``model.stack`` becomes a :class:`~megaponder.parallel.pipeline.PipelinedStack`.
    The embedding and head are replicated over pp, or with ``parallel.shard_vocab_over_pp``
    split over all tp x pp ranks of the replica (the same vocab-parallel layers and hooks,
    over the model-parallel group).
Every parameter is then tagged so that DeepSpeed's gradient-norm computation (clipping)
counts each unique element exactly once (:func:`mark_norm_ownership`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.spec import family_spec, require
from ..models.base import IGNORE_INDEX
from .pipeline import PipelinedStack
from .state import RNG, Topology, checkpointed_call
from .tensor import (_rank, _size, ColumnParallelLinear, copy_to_tp, gather_from_tp,
                     RowParallelLinear, scatter_to_tp, VocabParallelEmbedding,
                     register_sequence_parallel_grad_sync, vocab_parallel_cross_entropy,
                     vocab_parallel_ponder_embedding)


# --------------------------------------------------------------------------- family hooks
class VocabParallelOps:
    """The model's ``vocab_ops``: vocab-sized ops over a vocabulary split across ``group``
    (cross-entropy, pondering embedding). A plain object, not a module: an nn.Module
    attribute would land in ``_modules`` and lose to the class's ``vocab_ops = None``."""

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel

    def lm_loss(self, logits, targets):
        return vocab_parallel_cross_entropy(logits, targets, self.group, IGNORE_INDEX)

    def ponder_embedding(self, logits, weight):
        return vocab_parallel_ponder_embedding(logits, weight, self.group, self.sequence_parallel)

    def __repr__(self) -> str:
        return f"VocabParallelOps(ranks={_size(self.group)}, sequence_parallel={self.sequence_parallel})"


# --------------------------------------------------------------------------- parallelize
def _layers(stack) -> list:
    layers = stack.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


class Transparent(nn.Module):
    """Base of the parallel wrappers: runs ``inner`` in some context while keeping every
    state-dict key, parameter name and attribute of ``inner`` where it was.

    ``inner``'s direct children, parameters and buffers are registered on the wrapper under
    their own names (``inner`` itself is held outside ``_modules``), so ``stack.layers.3...``
    stays ``stack.layers.3...`` for checkpoints, :func:`gather_full_state_dict`,
    :func:`load_full_state_dict`, the universal reshard and the pipeline stages, while
    ``print(model)`` names the wrapper that runs. Other attributes (``num_heads``,
    ``rotary``, ``final_norm`` ...) read through to ``inner``. Wrap after sharding: a child
    replaced on the wrapper later would not reach ``inner``'s forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        # the same dicts' entries, not add_module/register_*: those refuse names that
        # __getattr__ already finds on inner
        self._modules.update(inner._modules)
        self._parameters.update(inner._parameters)
        self._buffers.update(inner._buffers)
        self._non_persistent_buffers_set |= inner._non_persistent_buffers_set

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["inner"], name)

    def train(self, mode: bool = True):
        # inner is not a registered child: its own flag (attention dropout reads
        # self.training) must follow the wrapper's
        self.inner.train(mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"inner={type(self.inner).__name__}"


def unwrap(module: nn.Module) -> nn.Module:
    """The module under any :class:`Transparent` wrappers."""
    while isinstance(module, Transparent):
        module = module.inner
    return module


class InTPRngStream(Transparent):
    """Runs ``inner`` drawing its random numbers from the per-TP-rank stream (dropout on
    tensors that are split over TP: the local heads' attention probabilities,
    sequence-parallel shards)."""

    def forward(self, *args, **kwargs):
        with RNG.tensor_parallel():
            return self.inner(*args, **kwargs)


class TensorParallelStack(Transparent):
    """The stack's attention-score bias (PonderLM-3's log-survival, a function of the
    replicated router) is added to this rank's heads only: like any replicated tensor that
    enters the TP region, its gradient must be summed over TP (copy_to_tp)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__(inner)
        object.__setattr__(self, "_group", group)

    def forward(self, inputs_embeds, position_ids, spec=None, *args, **kwargs):
        if spec is not None and spec.key_bias is not None and spec.key_bias.requires_grad:
            spec = dataclasses.replace(spec, key_bias=copy_to_tp(spec.key_bias, self._group))
        return self.inner(inputs_embeds, position_ids, spec, *args, **kwargs)


def _split_heads(attn: nn.Module, tp: int) -> None:
    """This rank's share of the attention heads (query heads and, for grouped-query
    attention, key/value heads: rank r holds kv heads [r*KV/tp, (r+1)*KV/tp) and exactly the
    query heads that read them, the query heads of one kv head being contiguous)."""
    counts = {a: getattr(attn, a) for a in ("num_heads", "num_kv_heads") if getattr(attn, a, None)}
    for attr, n in counts.items():   # check all before changing any
        if n % tp:
            raise ValueError(f"parallel.tp={tp} does not divide model.{attr}={n}: "
                             f"choose a tp that divides both head counts")
    for attr, n in counts.items():
        setattr(attn, attr, n // tp)


_TP_LINEAR = {"column": ColumnParallelLinear, "row": RowParallelLinear}


def _apply_tp(model: nn.Module, topo: Topology) -> None:
    """Shard every layer by its class's ``TP_PLAN`` (submodule path -> "column" | "row").
    Column blocks are contiguous output rows per rank: NeoX's fused qkv (per-head [q|k|v]
    rows) and LLaMA's separate q/k/v projections (heads, k/v by kv heads) both give each
    rank whole heads."""
    g, sp = topo.tp_group, topo.sequence_parallel
    for layer in _layers(model.stack):
        plan = getattr(type(layer), "TP_PLAN", None)
        if not plan:
            raise ValueError(f"{type(layer).__name__} declares no TP_PLAN: it cannot be "
                             f"tensor-parallel (set parallel.tp=1)")
        _split_heads(layer.attn, topo.tp)
        for path, style in plan.items():
            if style not in _TP_LINEAR:
                raise ValueError(f"{type(layer).__name__}.TP_PLAN[{path!r}] = {style!r}: "
                                 f"use 'column' or 'row'")
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            setattr(parent, name, _TP_LINEAR[style](getattr(parent, name), g, sp))
        if layer.attn.dropout_p > 0:   # each rank's heads get their own masks
            layer.attn = InTPRngStream(layer.attn)
        if sp and layer.dropout.p > 0:   # the residual stream is a sequence shard here
            layer.dropout = InTPRngStream(layer.dropout)
    model.stack = TensorParallelStack(model.stack, g)


class SequenceShardedStack(Transparent):
    """Sequence parallelism inside the stack only (pondering families). The family's
    per-iteration work (head, pondering embedding, gates, halting masks, K/V-reuse) runs on
    full-length tensors replicated over TP, so each stack call takes its rank's sequence
    chunk of the replicated input (backward: all-gather) and all-gathers its output
    (backward: keep own chunk, the incoming gradient being replicated). Inside, the layers
    and the final LayerNorm run sequence-parallel as for vanilla."""

    def __init__(self, inner: nn.Module, group):
        super().__init__(inner)
        object.__setattr__(self, "_group", group)

    def forward(self, inputs_embeds, position_ids, spec=None, kv_hook=None, apply_final_norm=True):
        hidden, kvs = self.inner(scatter_to_tp(inputs_embeds, self._group, 1), position_ids, spec,
                                 kv_hook=kv_hook, apply_final_norm=apply_final_norm)
        return gather_from_tp(hidden, self._group, 1), kvs


def vocab_group(topo: Topology, cfg) -> tuple:
    """(group, size) the embedding and head are split over: tp x pp with
    ``parallel.shard_vocab_over_pp`` and pp > 1 (they are otherwise replicated over pp), else
    the TP group. Size 1 means they stay whole."""
    if topo.pp > 1 and cfg.parallel.shard_vocab_over_pp:
        return topo.mp_group, topo.tp * topo.pp
    return topo.tp_group, topo.tp


def _apply_vocab_parallel(model: nn.Module, group, sequence_parallel: bool) -> None:
    """Vocab-parallel embedding and head over ``group``, and the family hooks (cross-entropy,
    pondering embedding) that work on the split vocabulary."""
    tied = model.embed_out.weight is model.embed_in.weight
    model.embed_in = VocabParallelEmbedding(model.embed_in, group, sequence_parallel)
    model.embed_out = ColumnParallelLinear(model.embed_out, group, sequence_parallel)
    if tied:
        model.embed_out.weight = model.embed_in.weight
    model.vocab_ops = VocabParallelOps(group, sequence_parallel)


def _apply_sequence_parallel_grad_sync(module: nn.Module, topo: Topology) -> None:
    if topo.sequence_parallel:
        replicated = [p for p in module.parameters() if not getattr(p, "tp_sharded", False)]
        module._sp_hooks = register_sequence_parallel_grad_sync(replicated, topo.tp_group)


def mark_norm_ownership(model: nn.Module, topo: Topology) -> None:
    """Tag parameters for DeepSpeed's model-parallel gradient norm.

    DeepSpeed sums squared gradient norms over the data-parallel and model-parallel (tp x pp)
    groups and counts a parameter on a rank if ``tensor_model_parallel``/``model_parallel``
    is set, or if the rank is model-parallel rank 0; ZeRO-1/2 skip ``ds_pipe_replicated``
    ones. We set the flags so that exactly one copy of every gradient element is counted:
    a TP-replicated parameter on TP rank 0 only, a pipeline-replicated one (embedding, head,
    final LayerNorm, family extras) on pipeline rank 0 only."""
    pp_local = {id(p) for p in model.stack.layers.parameters()} if topo.pp > 1 else None
    for p in model.parameters():
        sharded = getattr(p, "tp_sharded", False)
        spans_pp = topo.pp > 1 and sharded and p.shard_group is topo.mp_group  # shard_vocab_over_pp
        local = pp_local is None or id(p) in pp_local or spans_pp
        count_here = (sharded or topo.tp_rank == 0) and (local or topo.pp_rank == 0)
        p.tensor_model_parallel = count_here
        p.model_parallel = count_here
        p.ds_pipe_replicated = (not local) and topo.pp_rank != 0


def parallelize(model: nn.Module, cfg, topo: Topology) -> nn.Module:
    """In place: the tp/pp form of a single-device model built with identical weights on
    every rank (same seed). Returns the model."""
    if topo.tp * topo.pp > 1 and getattr(model, "_mp_full_shapes", None) is not None:
        raise RuntimeError("model is already parallelized")
    model._mp_full_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if topo.pp > 1:
        model.stack = PipelinedStack(model.stack, topo, chunks=cfg.parallel.pipeline_chunks)
    stack_only_sp = topo.sequence_parallel and not family_spec(cfg.model.family).plain_backbone
    if topo.sequence_parallel:
        require(cfg.model.family, "sequence_parallel")
    if topo.tp > 1:
        _apply_tp(model, topo)
    if stack_only_sp:
        model.stack = SequenceShardedStack(model.stack, topo.tp_group)
    group, shards = vocab_group(topo, cfg)
    if shards > 1:
        _apply_vocab_parallel(model, group, topo.sequence_parallel and not stack_only_sp)
    if topo.tp > 1:
        # the parameters used on sequence shards: the whole model's replicated ones for
        # vanilla, the stack's (LayerNorms, row-parallel biases, final norm) otherwise
        _apply_sequence_parallel_grad_sync(model.stack if stack_only_sp else model, topo)
    if cfg.parallel.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    mark_norm_ownership(model, topo)
    model._mp_topology = topo
    return model


class Checkpointed(Transparent):
    """``inner`` (a layer, or the whole single-device stack) with its activations recomputed in
    backward; keys and attributes stay ``inner``'s."""

    def __init__(self, inner: nn.Module, granularity: str):
        super().__init__(inner)
        self._ckpt = granularity

    def forward(self, *args, **kwargs):
        return checkpointed_call(self.inner, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"inner={type(self.inner).__name__}, granularity={self._ckpt}"


def apply_activation_checkpointing(model: nn.Module, granularity: str = "layer") -> None:
    """Recompute activations in backward, per ``layer`` or per ``iteration``.

    ``iteration`` checkpoints one call of this rank's layers: the whole stack at pp=1, the
    rank's own stage inside the looped pipeline otherwise (the pipeline's send/recv stay
    outside the recompute). A recurrent model keeps one [B, T, d] tensor per iteration
    instead of one per layer per iteration. K/V handed to the next iteration (KV reuse) are
    outputs of the checkpointed call and stay alive as before."""
    if granularity not in ("layer", "iteration"):
        raise ValueError(f"activation checkpointing granularity {granularity!r}: use layer or iteration")
    stack = unwrap(model.stack)
    if any(getattr(m, "_ckpt", None) for m in [stack, *_layers(stack)]):
        raise RuntimeError("activation checkpointing is already applied")
    if granularity == "layer":
        layers = stack.layers
        for key, layer in (layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)):
            layers[key] = Checkpointed(layer, granularity)
    elif isinstance(stack, PipelinedStack):
        # the recompute must sit inside the looped pipeline, around this rank's own layers
        stack.checkpoint_stage(granularity)
    else:
        # innermost: the wrappers' context (TP key-bias sum, sequence shards) stays outside
        wrapped = Checkpointed(stack, granularity)
        if not isinstance(model.stack, Transparent):
            model.stack = wrapped
        else:
            outer = model.stack
            while isinstance(outer.inner, Transparent):
                outer = outer.inner
            object.__setattr__(outer, "inner", wrapped)


# --------------------------------------------------------------------------- state dicts
def _local_params(model: nn.Module) -> dict:
    named = dict(model.named_parameters(remove_duplicate=False))
    return named


def full_tensor(local: torch.Tensor, param) -> torch.Tensor:
    """The single-device value of ``local``, this rank's part of (a tensor shaped like)
    ``param``: all-gathered over the parameter's shard group when it is TP / vocab sharded.
    Collective over that group."""
    group = getattr(param, "shard_group", None)
    if not getattr(param, "tp_sharded", False) or _size(group) <= 1:
        return local
    parts = [torch.empty_like(local) for _ in range(_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def local_shard(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's part of ``full`` (a single-device tensor shaped like ``param``'s full
    form): the inverse of :func:`full_tensor`, without communication."""
    group = getattr(param, "shard_group", None)
    if not getattr(param, "tp_sharded", False) or _size(group) <= 1:
        return full
    return full.chunk(_size(group), dim=param.partition_dim)[_rank(group)]


def _zero3_gather(model: nn.Module):
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        import contextlib
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gather_full_state_dict(model: nn.Module, topo: Optional[Topology] = None) -> Optional[dict]:
    """The single-device state dict (same names, shapes and order as the unparallelized
    model), on global rank 0; ``None`` on other ranks. Collective: call on every rank.
    TP shards are all-gathered over the TP group, ZeRO-3 partitions over the DP group, and
    pipeline stages are sent to rank 0."""
    topo = topo or model._mp_topology
    named = _local_params(model)
    local: dict = {}
    with _zero3_gather(model):
        for name, tensor in model.state_dict(keep_vars=True).items():
            local[name] = full_tensor(tensor.detach(), named.get(name, tensor)).cpu().clone()
    if topo.tp_rank != 0 or topo.dp_rank != 0:
        return None
    if topo.pp > 1:
        gathered = [None] * topo.pp if topo.pp_rank == 0 else None
        dist.gather_object(local, gathered, dst=topo.pp_ranks[0], group=topo.pp_group)
        if topo.pp_rank != 0:
            return None
        for part in gathered[1:]:
            for k, v in part.items():
                local.setdefault(k, v)
    order = list(getattr(model, "_mp_full_shapes", local).keys())
    missing = [k for k in order if k not in local]
    if missing:
        raise RuntimeError(f"gather_full_state_dict: no rank holds {missing[:5]}")
    return {k: local[k] for k in order}


def shard_state_dict(full_state: dict, model: nn.Module, topo: Optional[Topology] = None) -> dict:
    """This rank's part of a full (single-device) state dict, keyed like ``model.state_dict()``."""
    topo = topo or model._mp_topology
    named = _local_params(model)
    out = {}
    for name in model.state_dict().keys():
        if name not in full_state:
            raise KeyError(f"shard_state_dict: '{name}' missing from the full state dict")
        p = named.get(name)
        out[name] = (local_shard(full_state[name], p) if p is not None else full_state[name]).clone()
    return out


def load_full_state_dict(model: nn.Module, full_state: dict, topo: Optional[Topology] = None) -> None:
    """Load a full state dict into a parallelized model (before ``build_engine``; with
    ZeRO-3 after it, call inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``)."""
    model.load_state_dict(shard_state_dict(full_state, model, topo), strict=True)
