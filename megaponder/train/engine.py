"""DeepSpeed for every parallel layout, and one ``train_step`` per optimizer step.

    topo = topology_from_config(cfg)                     # or init_distributed(tp, pp, ...)
    model = parallelize(build_model(cfg), cfg, topo)
    engine = build_engine(model, cfg, topo, lr_lambda=lambda step: ...)
    for step in range(cfg.train.steps):
        stats = engine.train_step(batch)                  # batch: this DP rank's sequences
    engine.save(ckpt_dir)                                 # <ckpt>/model.pt + <ckpt>/deepspeed/

The DeepSpeed JSON is derived from the Config (:func:`deepspeed_config`); gradient clipping is
always explicit (DeepSpeed's default is 1.0). The same path serves tp, pp, dp and their
products: the module handed to ``deepspeed.initialize`` holds this rank's parameters
(pipeline stages live inside it, see pipeline.py), the ``mpu`` gives DeepSpeed the data
parallel group for gradient averaging and the model-parallel group for the gradient norm.
ZeRO 2/3 with pp>1 is refused at config time (megaponder.config.validate).
"""
from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from ..collectives import any_rank_on_device, collective_device
from ..parallel.parallelize import gather_full_state_dict
from ..parallel.state import Topology, skip_cpu_shm_comm_op
from .checkpoint import weights_only_loads

Batch = dict


def deepspeed_config(cfg, topo: Topology) -> dict:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    if t.precision == "fp16":
        raise ValueError("fp16 is not supported (DeepSpeed refuses it on CPU); use bf16 or fp32.")
    if p.zero_stage > 1 and topo.pp > 1:
        raise ValueError(f"parallel.zero_stage={p.zero_stage} cannot be combined with pp={topo.pp}; "
                         f"set parallel.zero_stage to 0 or 1.")
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * topo.dp,
        "gradient_clipping": float(o.grad_clip),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": p.zero_stage, "reduce_bucket_size": int(p.zero_bucket_size),
                              "allgather_bucket_size": int(p.zero_bucket_size)},
        # check_grad_overflow: skip a step whose reduced gradients hold NaN/Inf also in bf16
        # (DeepSpeed's default for it has changed between releases; train/guards.py relies on it)
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
    }
    if t.precision == "bf16":
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float,
                 split: Optional[set] = None, lr: Optional[float] = None,
                 lr_scales: Optional[dict[str, float]] = None) -> list[dict]:
    """GPT-NeoX's split: no weight decay on biases and LayerNorm parameters. With ``split``
    (the family's own parameter names, for train.phases) each of the two is split again into
    family parameters first and backbone parameters, tagged ``"backbone": bool``, so a phase
    can set the backbone's learning rate alone (megaponder/train/phases.py). ``lr_scales``
    (name -> multiple of ``lr``, the model's parameter_lr_scales) puts those parameters in
    groups of their own with ``"lr": lr * multiple``; the LR schedule scales every group's
    own base rate, so they follow the same schedule."""
    lr_scales = lr_scales or {}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append((name, param))
    groups = []
    for backbone in ((False, True) if split is not None else (None,)):
        for mult in [None] + sorted(set(lr_scales.values())):
            for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
                params = [p for n, p in members if (backbone is None or (n not in split) == backbone)
                          and lr_scales.get(n) == mult]
                groups.append({"params": params, "weight_decay": wd}
                              | ({} if backbone is None else {"backbone": backbone})
                              | ({} if mult is None else {"lr": lr * mult}))
    return [g for g in groups if g["params"]]


def split_micro_batches(batch: Union[Batch, list], n: int) -> list[Batch]:
    if isinstance(batch, (list, tuple)):
        if len(batch) != n:
            raise ValueError(f"train_step got {len(batch)} micro-batches, expected "
                             f"train.grad_accum_steps={n}")
        return list(batch)
    out: list[dict] = [dict() for _ in range(n)]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.shape[0] % n:
                raise ValueError(f"batch['{key}'] has {value.shape[0]} rows, not a multiple of "
                                 f"grad_accum_steps={n}")
            for i, chunk in enumerate(value.chunk(n, dim=0)):
                out[i][key] = chunk
        else:
            for d in out:
                d[key] = value
    return out


class StepStats(MutableMapping):
    """What :meth:`ParallelEngine.train_step` returns: a dict of floats whose device values
    are read only when first asked for.

    ``lr`` and ``skipped`` are host values from the start. The rest (losses, the model's
    statistics, the gradient norm) stay device tensors until any of them is read; then all
    of them are reduced at once (:meth:`ParallelEngine.read_step_stats`: one DP all-reduce,
    one host read). That read is a collective over the DP group: every rank reads the same
    steps' stats (the training loop reads on logging steps only, on every rank)."""

    def __init__(self, engine: "ParallelEngine", sums: dict, norm, host: dict, step: int,
                 skipped: bool):
        self._engine, self._sums, self._norm = engine, sums, norm
        self._host = dict(host)
        self._step, self._skipped = step, skipped
        self._read = False

    def _materialize(self) -> None:
        if self._read:
            return
        values = self._engine.read_step_stats(self._sums, self._norm)
        norm = values.pop("grad_norm")
        self._read, self._sums = True, {}
        # (DeepSpeed reports a non-finite norm as inf, or as -1 in some of its helpers)
        if not self._skipped and norm is not None and not (math.isfinite(norm) and norm >= 0):
            # only if DeepSpeed applied a non-finite update (its overflow check off, as in
            # releases whose bf16 default was check_grad_overflow=false): the weights are lost
            from ..train.guards import TrainingDiverged
            raise TrainingDiverged(
                f"step {self._step}: DeepSpeed applied an update whose gradient norm is "
                f"{norm} (its non-finite gradient check did not skip it); the weights are not "
                f"trustworthy. checkpoints/latest stays on the last good checkpoint; resume "
                f"from it.")
        host = self._host
        self._host = {**values, "grad_norm": norm if norm is not None else float("nan")}
        self._host.update(host)

    def read(self) -> dict:
        """Every value as a plain dict (reads the device values: collective)."""
        self._materialize()
        return dict(self._host)

    def __getitem__(self, key):
        if key not in self._host:
            self._materialize()
        return self._host[key]

    def __setitem__(self, key, value) -> None:
        self._host[key] = value

    def __delitem__(self, key) -> None:
        if key not in self._host:
            self._materialize()
        del self._host[key]

    def __contains__(self, key) -> bool:
        return key in self._host or (not self._read and (key in self._sums or key == "grad_norm"))

    def __iter__(self):
        self._materialize()
        return iter(list(self._host))

    def __len__(self) -> int:
        self._materialize()
        return len(self._host)

    def __repr__(self) -> str:
        return f"StepStats({self._host if self._read else 'unread'})"


class ParallelEngine:
    """A DeepSpeed engine plus the topology; ``train_step`` is one optimizer step."""

    def __init__(self, ds_engine, model, cfg, topo: Topology, base_optimizer=None):
        from .guards import FAULT_NAN_GRAD_ENV, LossGuard, injected_nan_steps

        self.engine, self.model, self.cfg, self.topo = ds_engine, model, cfg, topo
        self.step_count = 0
        self.base_optimizer = base_optimizer
        self.guard = LossGuard(cfg.train.loss_spike_factor, cfg.train.loss_spike_warmup)
        self._nan_steps = injected_nan_steps(topo.rank)
        self._nan_grad_steps = injected_nan_steps(topo.rank, FAULT_NAN_GRAD_ENV)
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        self._bf16_optimizer = isinstance(ds_engine.optimizer, BF16_Optimizer)
        bf16 = getattr(ds_engine, "_config", None) and ds_engine._config.bfloat16_config
        # megaponder's config always turns DeepSpeed's bf16 gradient check on; a config
        # without it (some releases' default) needs the gradient norm read every step
        self._unchecked_bf16 = bool(bf16 and bf16.enabled and not bf16.check_grad_overflow)

    @property
    def module(self):
        return self.engine.module

    def train_step(self, batch: Union[Batch, list]) -> "StepStats":
        """Forward/backward over ``train.grad_accum_steps`` micro-batches of this DP rank's
        data (a dict of [grad_accum*micro, T] tensors, split along rows, or a list of
        micro-batch dicts), then one optimizer step. Keys are passed to the model
        (``input_ids``, ``targets``, optional ``position_ids``/``attention_mask``/
        ``segment_ids``). Returns a :class:`StepStats`: floats averaged over micro-batches
        and DP ranks, ``loss``, ``lm_loss``, every numeric entry of ``ModelOutput.stats``,
        plus ``grad_norm``, ``lr`` and ``skipped`` (1.0 when the update was skipped on every
        rank for a non-finite or spiking loss, see megaponder.train.guards).

        Host syncs: the losses and statistics stay on the device; the step reads one value
        (the skip decision, after one all-reduce). Reading any other entry of the result
        reduces all of them at once (one DP all-reduce, one host read): the loop does that on
        logging steps only, on every rank."""
        gas = self.cfg.train.grad_accum_steps
        micro = split_micro_batches(batch, gas)
        if hasattr(self.module, "set_step"):
            self.module.set_step(self.step_count)
        if hasattr(self.module, "set_draw_layout"):  # seeded draws keyed on the global micro-batch
            self.module.set_draw_layout(self.topo.dp_rank, self.topo.dp)
        self.engine.train()
        sums: dict = {}   # device tensors (and plain numbers the model reports as such)
        norm = None
        losses: list[torch.Tensor] = []
        skip = False
        for i, mb in enumerate(micro):
            # the data pipeline yields CPU tensors; the model lives on the engine's device
            mb = {k: v.to(self.engine.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in mb.items()}
            out = self.engine(**mb)
            loss, lm_loss = out.loss, out.lm_loss if out.lm_loss is not None else out.loss
            if self.step_count + 1 in self._nan_steps:  # fault injection (tests only)
                loss, lm_loss = loss * float("nan"), lm_loss * float("nan")
            if self.step_count + 1 in self._nan_grad_steps:  # finite loss, NaN gradients
                loss.register_hook(lambda grad: grad * float("nan"))
            losses.append(loss.detach().float())
            if i > 0 and self._bf16_optimizer:
                # DeepSpeed's bf16 optimizer (ZeRO-1 + bf16) adds each micro-batch's bf16
                # gradients into its fp32 buffer after backward, but leaves them in .grad, where
                # the next backward accumulates on top: micro-batch k would count gas-k times.
                # Clearing them here is what its backward prologue is meant to do.
                self.engine.optimizer.clear_lp_grads()
            self.engine.backward(loss)
            if i == gas - 1:
                if self.engine.zero_optimization_stage() == 0:
                    norm = self._plain_grad_norm()  # ZeRO-0 does not record the norm it clips with
                skip = self._decide_skip(torch.stack(losses), norm)
            self.engine.step()
            # float64 as the host sums were: the logged values do not change
            vals = {"loss": losses[-1].double(), "lm_loss": lm_loss.detach().double()}
            for k, v in (out.stats or {}).items():
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
                    vals[k] = v.detach().double().reshape(()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v / gas
        if self.base_optimizer is not None:
            self.base_optimizer.skip_next = False
        if not self.engine.was_step_applied():
            # DeepSpeed's ZeRO/bf16 optimizers skipped it themselves (non-finite reduced
            # gradients; their check is global, so every rank agrees)
            skip = True
            if self.engine.lr_scheduler is not None:
                # DeepSpeed leaves the schedule where it was after a skipped step; megaponder
                # keeps it a function of the step number (the batch is consumed all the same)
                self.engine.lr_scheduler.step()
        self.guard.update(losses, skip)
        self.step_count += 1
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        stats = StepStats(self, sums, norm, host={"lr": float(self.engine.get_lr()[0]),
                                                  "skipped": float(skip)},
                          step=self.step_count, skipped=skip)
        if self._unchecked_bf16:
            # DeepSpeed's bf16 optimizer applies non-finite gradients when its check is off:
            # read the norm now, so such an update stops the run at this step
            stats.read()
        return stats

    def _decide_skip(self, losses: torch.Tensor, grad_norm) -> bool:
        """One all-reduce and one host read: skip this update on every rank if any rank saw
        a non-finite loss or gradient norm (or a loss spike). The base optimizer then leaves
        weights and state alone; DeepSpeed's ZeRO/bf16 optimizers also skip non-finite
        reduced gradients."""
        skip = any_rank_on_device(self.guard.local_flag(losses, grad_norm))
        if skip:
            if self.base_optimizer is None or not hasattr(self.base_optimizer, "skip_next"):
                raise RuntimeError("a non-finite or spiking loss needs the step skipped, but the "
                                   "optimizer passed to build_engine cannot skip a step; use the "
                                   "default (megaponder.train.guards.SkippableAdamW).")
            self.base_optimizer.skip_next = True
        return skip

    def _plain_grad_norm(self) -> torch.Tensor:
        """The global gradient norm as a device tensor (DeepSpeed's model-parallel aware
        norm; with max_norm=inf it scales nothing and reads nothing on the host)."""
        from deepspeed.runtime.utils import clip_grad_norm_
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return torch.tensor(float("nan"))
        return clip_grad_norm_(params, max_norm=float("inf"), mpu=self.topo.mpu()
                               if dist.is_initialized() else None).reshape(())

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict:
        self.engine.eval()
        out = self.engine(**batch)
        vals = {"loss": float(out.loss), "lm_loss": float(out.lm_loss if out.lm_loss is not None else out.loss)}
        return self._dp_mean(vals)

    def _dp_mean(self, vals: dict) -> dict:
        if self.topo.dp == 1 or not vals:
            return dict(vals)
        keys = sorted(vals)
        t = torch.tensor([vals[k] for k in keys], dtype=torch.float64, device=collective_device())
        dist.all_reduce(t, group=self.topo.dp_group)
        return {k: v / self.topo.dp for k, v in zip(keys, t.tolist())}

    def read_step_stats(self, sums: dict, norm) -> dict:
        """The device values of one step as floats: DP means of ``sums`` (one all-reduce over
        the DP group, as one float64 vector) and the global ``norm``, in one host read."""
        keys = list(sums)
        device = collective_device()
        parts = [torch.as_tensor(sums[k], dtype=torch.float64).to(device).reshape(1) for k in keys]
        vector = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        if self.topo.dp > 1 and keys:
            dist.all_reduce(vector, group=self.topo.dp_group)
            vector = vector / self.topo.dp
        if norm is not None:
            vector = torch.cat([vector, torch.as_tensor(norm, dtype=torch.float64).to(device).reshape(1)])
        values = vector.tolist()   # the one host read
        # the order of the keys as before (with dp > 1 the DP mean sorted them)
        out = {k: values[keys.index(k)] for k in (sorted(keys) if self.topo.dp > 1 else keys)}
        out["grad_norm"] = values[-1] if norm is not None else None
        return out

    # -- checkpoints ------------------------------------------------------------------
    def full_state_dict(self) -> Optional[dict]:
        """Consolidated single-device weights on global rank 0 (None elsewhere); collective."""
        return gather_full_state_dict(self.module, self.topo)

    def save(self, ckpt_dir: str, client_state: Optional[dict] = None) -> None:
        """``<ckpt_dir>/model.pt`` (full weights, rank 0) and ``<ckpt_dir>/deepspeed/``
        (engine, optimizer and ZeRO state of every rank, for resume). Collective."""
        full = self.full_state_dict()
        if self.topo.rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            tmp = os.path.join(ckpt_dir, "model.pt.tmp")
            torch.save(full, tmp)
            os.replace(tmp, os.path.join(ckpt_dir, "model.pt"))
        state = dict(client_state or {})
        state["megaponder_step"] = self.step_count
        self.engine.save_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="state",
                                    client_state=state)

    def load(self, ckpt_dir: str) -> dict:
        """Resume from :meth:`save` (same layout: tp, pp, dp, ZeRO stage). Returns the
        client state. DeepSpeed's files are read with ``weights_only=True`` (see
        :func:`weights_only_loads`)."""
        with weights_only_loads():
            _, client = self.engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="state")
        client = client or {}
        self.step_count = int(client.get("megaponder_step", self.step_count))
        return client


def build_engine(model: torch.nn.Module, cfg, topo: Topology,
                 lr_lambda: Optional[Callable[[int], float]] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> ParallelEngine:
    """``deepspeed.initialize`` on a parallelized model: torch AdamW (GPT-NeoX decay split;
    no JIT op to build; ``optim.fused``: torch's fused kernel), ``LambdaLR(lr_lambda)`` if
    given, DS config from the Config; ``model.compile`` compiles the layers (``true``) or the
    whole model (``whole``) first."""
    import deepspeed

    from .guards import SkippableAdamW

    skip_cpu_shm_comm_op()
    o = cfg.optim
    if cfg.model.compile == "whole":   # forward by Dynamo, backward by AOT autograd, in place
        model.compile()
    elif cfg.model.compile:
        from ..models.compile import compile_layers
        compile_layers(model)
    if optimizer is None:  # AdamW that can skip a non-finite step (train/guards.py)
        split = set(model.extra_parameter_names()) if cfg.train.phases else None
        optimizer = SkippableAdamW(param_groups(model, o.weight_decay, split, o.lr,
                                                model.parameter_lr_scales()),
                                   lr=o.lr,
                                   betas=(o.beta1, o.beta2), eps=o.eps,
                                   fused=True if o.fused else None)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
                 if lr_lambda is not None else None)
    if cfg.parallel.zero_stage == 3:
        prepare_zero3(model)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, topo), mpu=topo.mpu() if dist.is_initialized() else None)
    if ds_engine.zero_optimization_stage() == 3:
        register_zero3_external_parameters(model)
    return ParallelEngine(ds_engine, model, cfg, topo, base_optimizer=optimizer)


class PonderEmbeddingOp(torch.nn.Module):
    """The model's ``ponder_embedding`` (softmax @ W_in) run as a submodule, for ZeRO-3.

    ZeRO-3 gathers a module's parameters around that module's own forward and backward only,
    and finds the backward through the module's *tensor* outputs. The pondering embedding
    reads ``embed_in.weight`` outside ``embed_in``'s forward, and the model returns a
    ModelOutput (no hooks fire for it), so the weight would be partitioned when the matmul's
    backward needs it. As a parameter-less submodule with ``embed_in.weight`` registered as its
    external parameter, the op gets the weight gathered for its forward and its backward."""

    def __init__(self, fn):
        super().__init__()
        object.__setattr__(self, "_fn", fn)   # a bound method of the model: not a submodule

    def forward(self, logits):
        return self._fn(logits)


def prepare_zero3(model: torch.nn.Module) -> None:
    """Before ``deepspeed.initialize`` with ZeRO-3: route ``ponder_embedding`` through a
    submodule (see :class:`PonderEmbeddingOp`)."""
    if hasattr(model, "ponder_embedding") and not hasattr(model, "ponder_embedding_op"):
        model.ponder_embedding_op = PonderEmbeddingOp(model.ponder_embedding)
        # a plain instance attribute (not a second registration) shadows the class method
        object.__setattr__(model, "ponder_embedding", model.ponder_embedding_op)


def register_zero3_external_parameters(model: torch.nn.Module) -> None:
    """After ``deepspeed.initialize`` with ZeRO-3: ``embed_in.weight`` is an external
    parameter of the pondering-embedding op."""
    from deepspeed.runtime.zero import register_external_parameter
    op = getattr(model, "ponder_embedding_op", None)
    if op is not None:
        register_external_parameter(op, model.embed_in.weight)
