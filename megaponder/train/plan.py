"""``megaponder plan``: memory and FLOPs of a training run, per rank, before it is launched.

    megaponder plan --config examples/configs/pythia-410m-adaponderlm.yml --world-size 8 \
        --device H100 [--set parallel.tp=2 ...]

For every pipeline stage (tensor and data-parallel ranks of a stage hold the same shapes) it
prints the rank's

* parameters, and the bytes of the weights, gradients and optimizer state that DeepSpeed
  keeps for them at the configured precision and ZeRO stage (:func:`model_states`);
* DeepSpeed's communication buckets (ZeRO 1-3: ``parallel.zero_bucket_size`` elements);
* the activations of one forward + backward of a micro-batch, *measured*: this rank's
  parallelized model (``parallelize`` with the real tp/pp/sp layout, activation checkpointing
  and every pondering pass) runs one training forward and backward on fake tensors
  (``FakeTensorMode``: shapes only, nothing allocated, collectives of a fake process group
  do nothing) while :class:`megaponder.train.memory.LiveBytes` adds up the live bytes. Two
  micro-batch sizes give a fixed part and a per-sample part, hence
* the largest micro-batch that fits the device memory, and
* the training FLOPs per step (megaponder/models/flops.py: 3x the dense forward).

Training-time compaction (``ponder.train_compaction``) has data-dependent shapes that fake
tensors cannot follow: its activations are planned as the dense forward's (an upper bound).

``megaponder train`` runs the cheap part of the plan before building anything
(:func:`check_micro_batch_fits`): model states plus the logits of one micro-batch, a lower
bound of what the step needs; a micro-batch above the device memory is refused in one line
(exit 2) instead of being allocated (on CPU: swapping, then the OOM killer).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

GB = 1e9
#: DeepSpeed's default reduce/allgather bucket (elements) when the config sets none
DEEPSPEED_DEFAULT_BUCKET = int(5e8)


@dataclass
class RankPlan:
    rank: int
    pp_rank: int
    tp_rank: int
    parameters: int                 # this rank's share before ZeRO partitioning
    weights: float                  # bytes, after ZeRO partitioning where it applies
    gradients: float
    optimizer: float                # Adam moments and fp32 master weights
    buckets: float                  # DeepSpeed's communication buffers
    activations_fixed: float        # activations = fixed + per_sample * micro_batch
    activations_per_sample: float
    micro_batch: int
    memory: Optional[float] = None  # bytes of the device, when known
    notes: list = field(default_factory=list)

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buckets

    @property
    def activations(self) -> float:
        return self.activations_fixed + self.activations_per_sample * self.micro_batch

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def max_micro_batch(self) -> Optional[int]:
        if self.memory is None:
            return None
        room = self.memory - self.states - self.activations_fixed
        return max(0, int(room // self.activations_per_sample)) if self.activations_per_sample > 0 else None


def model_states(params: int, precision: str, zero: int, dp: int,
                 largest_layer: int = 0) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes of one rank holding ``params`` parameters, with
    DeepSpeed at ``zero`` over ``dp`` data-parallel ranks and torch AdamW (two fp32 moments).

    fp32: 4-byte weights and gradients, 8 bytes of moments. ZeRO-1/2/3 also keep an fp32 copy
    of the rank's partition of the weights that the optimizer updates (stage_1_and_2's
    ``single_partition_of_fp32_groups``, stage3's fp32 partition).
    bf16: 2-byte weights and gradients, fp32 gradient accumulation (megaponder sets
    ``grad_accum_dtype: fp32``: 4 bytes), fp32 master weights (4) and moments (8): DeepSpeed's
    "18 bytes per parameter" of mixed precision (2 + 4 + 4 + 8 besides the 16-bit weights).
    ZeRO-1 partitions the master weights and moments over dp, ZeRO-2 also the gradients (16-
    and 32-bit), ZeRO-3 also the 16-bit weights, plus the largest layer's 16-bit weights and
    gradients gathered while it runs (``largest_layer`` parameters, DeepSpeed's
    ``4 * largest_layer_params``). At ZeRO-2 this is DeepSpeed's
    ``estimate_zero2_model_states_mem_needs`` (2P + 18P/dp) exactly; at ZeRO-3 its
    ``estimate_zero3_model_states_mem_needs`` (4 x largest layer + 18P/dp) plus the 16-bit
    weight partition (2P/dp) that estimator leaves out."""
    p, n = float(params), float(dp)
    gathered = 0.0
    if precision == "bf16":
        weights, grads16, grads32, master, moments = 2 * p, 2 * p, 4 * p, 4 * p, 8 * p
        if zero >= 1:
            master, moments = master / n, moments / n
        if zero >= 2:
            grads16, grads32 = grads16 / n, grads32 / n
        if zero >= 3:
            weights, gathered = weights / n, 4.0 * largest_layer
        return weights + gathered / 2, grads16 + grads32 + gathered / 2, master + moments
    weights, grads, moments = 4 * p, 4 * p, 8 * p
    master = 0.0
    if zero >= 1:
        moments, master = moments / n, 4 * p / n
    if zero >= 2:
        grads = grads / n
    if zero >= 3:
        weights, gathered = weights / n, 8.0 * largest_layer
    return weights + gathered / 2, grads + gathered / 2, moments + master


def bucket_bytes(cfg) -> float:
    """ZeRO 1-3 allocate a contiguous reduce bucket of ``parallel.zero_bucket_size`` fp32
    elements (the gradients are reduced through it); ZeRO-0 none."""
    if cfg.parallel.zero_stage == 0:
        return 0.0
    return 4.0 * cfg.parallel.zero_bucket_size


def _fake_process_group(rank: int, world_size: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@contextlib.contextmanager
def _quiet():
    """The model's one-line notes (attention kernel choice) are not the plan's output."""
    import io
    import contextlib as cl
    with cl.redirect_stdout(io.StringIO()):
        yield


def measure_activations(model, cfg, micro_batch: int) -> float:
    """Peak live bytes of one training forward + backward of ``micro_batch`` sequences, over
    the weights and the gradients it leaves (call under FakeTensorMode to allocate nothing)."""
    from .memory import LiveBytes

    seq, vocab = cfg.data.seq_length, cfg.model.vocab_size
    ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    ids[:, 1::3] = vocab - 1   # some variety (not read under fake tensors)
    model.zero_grad(set_to_none=True)
    with LiveBytes() as live:
        out = model(ids, targets=ids)
        out.loss.backward()
        del out
    peak, grads = live.peak, live.current
    model.zero_grad(set_to_none=True)
    return float(peak - grads)


def plan_rank(cfg, world_size: int, rank: int, memory: Optional[float] = None) -> RankPlan:
    """The plan of global rank ``rank`` (builds its fake process group and model)."""
    import copy

    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..models import build_model
    from ..parallel.parallelize import parallelize
    from ..parallel.state import build_topology

    cfg = copy.deepcopy(cfg)
    notes = []
    if cfg.ponder.train_compaction:
        cfg.ponder.train_compaction = False
        notes.append("train_compaction: activations of the dense forward (an upper bound)")
    par = cfg.parallel
    _fake_process_group(rank, world_size)
    try:
        with _quiet():
            topo = build_topology(par.tp, par.pp, par.sequence_parallel)
            with torch.device("meta"):
                model = build_model(cfg)
                if cfg.train.precision == "bf16":   # DeepSpeed trains the module in bf16
                    model = model.to(torch.bfloat16)
            with FakeTensorMode(allow_non_fake_inputs=True):
                model = model.to_empty(device="cpu")
                model = parallelize(model, cfg, topo)
                model.train()
                params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                             if p.requires_grad)
                largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
                one = measure_activations(model, cfg, 1)
                two = measure_activations(model, cfg, 2)
    finally:
        dist.destroy_process_group()
    weights, grads, optimizer = model_states(params, cfg.train.precision, par.zero_stage, topo.dp,
                                              largest)
    return RankPlan(rank=rank, pp_rank=topo.pp_rank, tp_rank=topo.tp_rank, parameters=params,
                    weights=weights, gradients=grads, optimizer=optimizer,
                    buckets=bucket_bytes(cfg), activations_fixed=max(0.0, 2 * one - two),
                    activations_per_sample=max(0.0, two - one),
                    micro_batch=cfg.train.micro_batch_size, memory=memory, notes=notes)


def plan(cfg, world_size: int, memory: Optional[float] = None) -> list[RankPlan]:
    """One :class:`RankPlan` per pipeline stage (the first tensor/data-parallel rank of each):
    the other ranks of a stage hold the same shapes."""
    import torch.distributed as dist

    from ..parallel.state import build_topology

    par = cfg.parallel
    if world_size % (par.tp * par.pp):
        from ..config import ConfigError
        raise ConfigError(f"world size {world_size} is not a multiple of tp*pp = {par.tp * par.pp}.")
    if dist.is_initialized():
        raise RuntimeError("megaponder plan builds its own fake process group; run it outside "
                           "a distributed job")
    wanted, out = set(range(par.pp)), []
    for rank in range(world_size):
        _fake_process_group(rank, world_size)
        try:
            topo = build_topology(par.tp, par.pp, par.sequence_parallel)
            take = topo.pp_rank in wanted and topo.tp_rank == 0 and topo.dp_rank == 0
        finally:
            dist.destroy_process_group()
        if take:
            wanted.discard(topo.pp_rank)
            out.append(plan_rank(cfg, world_size, rank, memory))
        if not wanted:
            break
    return out


def step_flops(cfg, world_size: int) -> tuple[float, float]:
    """(training FLOPs of one optimizer step of the whole job, per rank)."""
    from ..data.schedule import grad_accum_for
    from ..models.flops import training_flops_per_token

    t = cfg.train
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    gas = grad_accum_for(t, dp)
    tokens = t.micro_batch_size * gas * dp * cfg.data.seq_length
    total = training_flops_per_token(cfg=cfg.model, ponder=cfg.ponder, seq_len=cfg.data.seq_length) * tokens
    return total, total / world_size


def device_memory(device: Optional[str], memory_gb: Optional[float]) -> tuple[Optional[float], str]:
    """(bytes, description) of one device: ``--memory-gb``, a table name (H100, A100 40GB,
    MI300X, ...), ``cuda``/``cuda:N`` (this machine's card) or ``cpu`` (RAM / local processes)."""
    if memory_gb:
        return memory_gb * GB, f"{memory_gb:g} GB (--memory-gb)"
    if not device:
        return None, "unknown (give --device or --memory-gb)"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return float(props.total_memory), f"{props.name}, {props.total_memory / GB:.1f} GB"
    if device == "cpu":
        return host_memory_per_process(), "host RAM / processes of this node"
    from .accelerators import find_accelerator
    acc = find_accelerator(device)
    if acc is None:
        from ..config import ConfigError
        from .accelerators import ACCELERATORS
        raise ConfigError(f"--device {device}: not a known accelerator (one of "
                          f"{', '.join(a.name for a in ACCELERATORS)}, cuda, cpu); or give --memory-gb.")
    return acc.memory_gb * GB, f"{acc.name}, {acc.memory_gb:g} GB"


def host_memory_per_process() -> float:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(local, 1)


def format_plan(cfg, world_size: int, plans: list[RankPlan], memory_note: str) -> str:
    par, t = cfg.parallel, cfg.train
    dp = world_size // (par.tp * par.pp)
    total, per_rank = step_flops(cfg, world_size)

    def gb(x):
        return f"{x / GB:,.2f}"
    lines = [f"{cfg.model.family} ({cfg.model.backbone}), d={cfg.model.hidden_size} "
             f"L={cfg.model.num_layers}, seq {cfg.data.seq_length}, {t.precision}, world {world_size}: "
             f"tp={par.tp} pp={par.pp} dp={dp}, ZeRO-{par.zero_stage}, activation checkpointing "
             f"{par.activation_checkpointing}, sequence parallel {par.sequence_parallel}",
             f"device memory: {memory_note}",
             "",
             "| rank (pp stage) | parameters | weights GB | gradients GB | optimizer GB | buckets GB "
             f"| activations GB (micro-batch {t.micro_batch_size}) | per sample GB | total GB "
             "| largest micro-batch that fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        fits = "?" if p.max_micro_batch is None else str(p.max_micro_batch)
        lines.append(f"| {p.rank} ({p.pp_rank}) | {p.parameters:,} | {gb(p.weights)} | {gb(p.gradients)} | "
                     f"{gb(p.optimizer)} | {gb(p.buckets)} | {gb(p.activations)} | "
                     f"{gb(p.activations_per_sample)} | {gb(p.total)} | {fits} |")
    lines.append("")
    lines.append(f"training FLOPs per optimizer step: {total:.3e} in all, {per_rank:.3e} per rank "
                 f"(3x the dense forward; megaponder/models/flops.py)")
    for note in sorted({n for p in plans for n in p.notes}):
        lines.append(f"note: {note}")
    worst = max(plans, key=lambda p: p.total)
    if worst.memory is not None and worst.total > worst.memory:
        lines.append(f"DOES NOT FIT: rank {worst.rank} needs {gb(worst.total)} GB of {gb(worst.memory)} GB; "
                     f"largest micro-batch that fits: {worst.max_micro_batch}")
    return "\n".join(lines)


def logits_bytes(cfg) -> float:
    """A lower bound of one micro-batch's activations: its fp32 logits over this rank's share
    of the padded vocabulary, once per pondering pass that computes logits (their softmax for
    the pondering embedding or the loss is kept for backward)."""
    from ..models.spec import family_spec

    m, p = cfg.model, cfg.ponder
    # vertical families compute logits on every pass (their softmax feeds the next input);
    # fixed-depth (vanilla, loop) and latent ones once per position
    passes = p.steps + 1 if family_spec(m.family).kind == "vertical" else 1
    return 4.0 * cfg.train.micro_batch_size * cfg.data.seq_length * m.padded_vocab() / cfg.parallel.tp * passes


def parameter_count(cfg) -> int:
    """Parameters of the whole model, counted on the meta device (nothing allocated)."""
    from ..models import build_model
    with torch.device("meta"), _quiet():
        model = build_model(cfg)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_micro_batch_fits(cfg, world_size: int, device: torch.device) -> None:
    """Refuse (ConfigError: one line, exit 2) a micro-batch whose lower bound (model states of
    an even share of the parameters plus the micro-batch's logits) exceeds one device's
    memory (``train.memory_gb``, else the CUDA card's, else host RAM per local process)."""
    from ..config import ConfigError

    par, t = cfg.parallel, cfg.train
    if t.memory_gb:
        memory, where = t.memory_gb * GB, "train.memory_gb"
    elif device.type == "cuda":
        memory, where = float(torch.cuda.get_device_properties(device).total_memory), torch.cuda.get_device_name(device)
    else:
        memory, where = host_memory_per_process(), "host RAM per process"
    dp = max(1, world_size // (par.tp * par.pp))
    share = parameter_count(cfg) / (par.tp * par.pp)
    need = sum(model_states(int(share), t.precision, par.zero_stage, dp)) + logits_bytes(cfg)
    if need > memory:
        per_sample = logits_bytes(cfg) / t.micro_batch_size
        room = memory - sum(model_states(int(share), t.precision, par.zero_stage, dp))
        largest = max(0, int(room // per_sample)) if per_sample > 0 else 0
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} cannot fit: at least {need / GB:,.1f} GB "
            f"per rank (model states + logits) of {memory / GB:,.1f} GB ({where}); use a "
            f"micro-batch below {largest} (megaponder plan --config ... gives the full estimate) "
            f"or set train.memory_gb.")


def plan_command(args) -> int:
    """``megaponder plan`` (its arguments: megaponder/cli.py)."""
    from ..config import load_config
    from .preflight import preflight

    cfg = load_config(args.config, args.set or [], check_paths=False)
    preflight(cfg, check_paths=False, world_size=args.world_size)
    memory, note = device_memory(args.device, args.memory_gb)
    plans = plan(cfg, args.world_size, memory)
    print(format_plan(cfg, args.world_size, plans, note))
    return 0
