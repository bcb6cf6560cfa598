"""Resume on another parallel layout: a layout-free copy of the training state.

DeepSpeed's own checkpoint (``<ckpt>/deepspeed/``) stores each rank's ZeRO flat partitions and
is only readable by the same (tp, pp, dp, ZeRO stage). Next to it every checkpoint gets
``universal/``: one folder per parameter of the *single-device* model, named by its full name,
holding the full fp32 master weight and Adam's two moments::

    universal/meta.json                       {"format": 1, "adam_step": N}
    universal/zero/<param name>/fp32.pt       {"param": tensor of the full shape}
    universal/zero/<param name>/exp_avg.pt
    universal/zero/<param name>/exp_avg_sq.pt

The layout is modeled on DeepSpeed's universal checkpoint (``ds_to_universal``: one folder
of full fp32/exp_avg/exp_avg_sq tensors per parameter), but written directly at save time
instead of by the offline conversion: that conversion needs the model to describe its
TP-sharded parameters the Megatron-DeepSpeed way (``universal_checkpoint_info``) and reads
ZeRO >= 1 checkpoints, while megaponder's tensor/pipeline parallelism is its own
(megaponder/parallel/parallelize.py knows how every local shard maps to its full parameter)
and ZeRO-0 is a common choice here.
torch.distributed.checkpoint would need every entry as a DTensor on a device mesh; ZeRO's
flat, parameter-unaligned partitions and megaponder's plain-tensor TP shards are neither.

Per parameter, DeepSpeed's accessors (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``, ZeRO 1-3 and the bf16 optimizer) assemble the value over
the data-parallel group, :func:`~megaponder.parallel.parallelize.full_tensor` over the tensor
(or vocabulary) shard group; one rank writes it and drops it before the next parameter, so no
rank ever holds more than one parameter's full state. Loading reads each file memory-mapped and
keeps this rank's slice (``local_shard``), then hands it to ``safe_set_full_fp32_param`` /
``safe_set_full_optimizer_state`` (ZeRO 1-3, bf16; under ZeRO-3 the working partitions are
then refreshed from the fp32 masters) or the torch optimizer's state (ZeRO-0).

What carries over and what does not (docs/training.md, "Resume on another layout"):
weights, Adam moments and step, the learning-rate schedule, step and consumed samples (so the
data position: the sample order depends on the global batch only) carry exactly. Per-rank RNG
streams cannot (their number and meaning change with the layout): they are re-seeded from
(train.seed, step), so such a resume is reproducible, but dropout masks after it differ from
the uninterrupted run's. Seeded per-batch draws (halting/pruning baselines) are keyed on the
step and global micro-batch and do not depend on the layout.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ..config import ConfigError
from .checkpoint import CheckpointError, safe_load

UNIVERSAL_DIR = "universal"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
FORMAT = 1


class ResumeError(ConfigError):
    """A checkpoint that cannot be resumed on this layout; the message says what to do (a
    ConfigError, so the command line prints it as one line)."""


def _inner_optimizer(ds_engine):
    """The torch optimizer: ZeRO and DeepSpeed's bf16 optimizer wrap it as ``.optimizer``;
    at ZeRO-0 fp32 DeepSpeed uses the client optimizer itself."""
    opt = ds_engine.optimizer
    return getattr(opt, "optimizer", opt)


def _deepspeed_owned(param) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and moments in flat partitions
    (ZeRO 1-3, bf16 optimizer): they are then reached through DeepSpeed's accessors."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _adam_step(inner) -> int:
    steps = [int(s["step"]) for s in inner.state.values() if "step" in s]
    return max(steps, default=0)


def _stage_local(model, topo) -> set:
    """ids of the parameters only this pipeline stage holds; the others (embedding, head,
    final norm, family extras) are replicated over pp (or vocab-sharded over tp x pp)."""
    if topo.pp == 1:
        return {id(p) for p in model.parameters()}
    return {id(p) for p in model.stack.layers.parameters()}


def _local_state(param, inner) -> dict:
    """This rank's (TP-local, data-parallel-complete) fp32 weight and moments of ``param``.
    Collective over the data-parallel group for DeepSpeed-owned parameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "ds_id"):   # ZeRO-3
        if not param.requires_grad:   # no optimizer state: gather the partitioned weight
            import deepspeed
            with deepspeed.zero.GatheredParameters([param]):
                fp32 = param.detach().float().clone()
            return {"fp32": fp32, "exp_avg": torch.zeros_like(fp32), "exp_avg_sq": torch.zeros_like(fp32)}
        out = {"fp32": safe_get_full_fp32_param(param)}
        for key in STATE_KEYS[1:]:
            out[key] = safe_get_full_optimizer_state(param, key)
        return {k: v.reshape(param.ds_shape) for k, v in out.items()}
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
        out = {"fp32": safe_get_full_fp32_param(param)}
        for key in STATE_KEYS[1:]:
            out[key] = _full_moment(param, key, inner)
        return out
    state = inner.state.get(param, {})
    zeros = torch.zeros_like(param, dtype=torch.float32)
    return {"fp32": param.detach().float(),
            "exp_avg": state.get("exp_avg", zeros).float(),
            "exp_avg_sq": state.get("exp_avg_sq", zeros).float()}


def _full_moment(param, key: str, inner) -> torch.Tensor:
    """``safe_get_full_optimizer_state`` for ZeRO-1/2 and the bf16 optimizer, read from the
    torch optimizer's state of the flat partition itself. DeepSpeed's per-parameter views are
    linked once, lazily, at the first step, and a parameter group whose state did not exist
    yet then (seen: the no-decay group under pp=2, ZeRO-1) stays unlinked, so the accessor
    raises on that rank while the others wait in its all-reduce. A partition with no state
    has never been updated: its moments are zero."""
    buf = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    mapping = param._hp_mapping
    if mapping is not None:
        flat = inner.param_groups[mapping.param_group_index]["params"][0]
        state = inner.state.get(flat, {})
        if key in state:
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            buf.narrow(0, lp.start, lp.numel).copy_(state[key].narrow(0, hp.start, hp.numel))
    dist.all_reduce(buf, group=param._dp_group)
    return buf.reshape(param.shape)


def save_universal(pengine, folder: str) -> None:
    """Write ``<folder>/universal/`` (collective: every rank calls it, in the same order)."""
    from ..parallel.parallelize import full_tensor

    model, topo = pengine.module, pengine.topo
    inner = _inner_optimizer(pengine.engine)
    local = _stage_local(model, topo)
    root = os.path.join(folder, UNIVERSAL_DIR)
    for name, param in model.named_parameters():
        state = _local_state(param, inner)
        full = {k: full_tensor(v, param) for k, v in state.items()}
        if topo.dp_rank == 0 and topo.tp_rank == 0 and (topo.pp_rank == 0 or id(param) in local):
            d = os.path.join(root, "zero", name)
            os.makedirs(d, exist_ok=True)
            for key, value in full.items():
                torch.save({"param": value.detach().cpu()}, os.path.join(d, f"{key}.pt"))
        del state, full
    if topo.rank == 0:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "meta.json"), "w") as f:
            json.dump({"format": FORMAT, "adam_step": _adam_step(inner)}, f)


def _read(d: str, key: str, expected_shape) -> torch.Tensor:
    path = os.path.join(d, f"{key}.pt")
    if not os.path.exists(path):
        raise ResumeError(f"{path} is missing: the checkpoint has no saved state for parameter "
                          f"'{os.path.basename(d)}' (another model family or shape, or an "
                          f"incomplete checkpoint).")
    state = safe_load(path, what="universal-checkpoint file", mmap=True)
    if not isinstance(state, dict) or "param" not in state:
        raise CheckpointError(f"{path} is not a universal-checkpoint file (no 'param' entry); "
                              f"restore it or resume from another checkpoint.")
    t = state["param"]
    if expected_shape is not None and tuple(t.shape) != tuple(expected_shape):
        raise ResumeError(f"{path} holds shape {tuple(t.shape)} but this model's parameter has "
                          f"{tuple(expected_shape)}: the checkpoint belongs to another model shape.")
    return t


def load_universal(pengine, folder: str) -> int:
    """Load ``<folder>/universal/`` into a freshly built engine of any layout (before its
    first step). Returns Adam's step count."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from ..parallel.parallelize import local_shard

    root = os.path.join(folder, UNIVERSAL_DIR)
    if not os.path.isfile(os.path.join(root, "meta.json")):
        raise ResumeError(f"{folder} has no layout-free state ({UNIVERSAL_DIR}/), so it can only "
                          f"resume on the layout it was saved with (see its meta.json).")
    meta = json.load(open(os.path.join(root, "meta.json")))
    zero3 = pengine.engine.zero_optimization_stage() == 3
    model = pengine.module
    inner = _inner_optimizer(pengine.engine)
    step = int(meta["adam_step"])
    step_t = torch.tensor(float(step), dtype=torch.float32)
    shapes = getattr(model, "_mp_full_shapes", {})
    optimized = {id(p) for g in inner.param_groups for p in g["params"]}
    ds_opt = pengine.engine.optimizer
    if any(_deepspeed_owned(p) for p in model.parameters()):
        # ZeRO-1/2/3 and DeepSpeed's bf16 optimizer keep Adam's moments on flat fp32
        # partitions that the first step creates lazily; create them here (the first step then
        # finds them, as after a same-layout load) and, ZeRO-1/2/bf16, link every parameter's
        # view into them.
        flats = (ds_opt.fp32_partitioned_groups_flat if zero3
                 else [flat for group in inner.param_groups for flat in group["params"]])
        for flat in flats:
            inner.state[flat] = {"step": step_t.clone(), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        if not zero3:
            ds_opt._lazy_init_hp_params_optimizer_state()
    with torch.no_grad():
        for name, param in model.named_parameters():
            d = os.path.join(root, "zero", name)
            vals = {k: local_shard(_read(d, k, shapes.get(name)), param) for k in STATE_KEYS}
            if zero3 and not param.requires_grad:   # partitioned, outside the optimizer
                import deepspeed
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.data.copy_(vals["fp32"].to(param.dtype))
                continue
            if not zero3:   # ZeRO-3: the parameter's own storage is a partition (set below)
                param.data.copy_(vals["fp32"].to(param.dtype))
            if _deepspeed_owned(param):
                safe_set_full_fp32_param(param, vals["fp32"])
                for key in STATE_KEYS[1:]:
                    safe_set_full_optimizer_state(param, vals[key], key)
            elif id(param) in optimized:
                inner.state[param] = {"step": step_t.clone(),
                                      "exp_avg": vals["exp_avg"].clone().to(param.dtype),
                                      "exp_avg_sq": vals["exp_avg_sq"].clone().to(param.dtype)}
    if zero3:   # the working (possibly low-precision) partitions from the fp32 masters
        for i in range(len(ds_opt.fp16_groups)):
            ds_opt._reassign_or_swap_out_partitioned_parameters(i)
    if dist.is_initialized():
        dist.barrier()
    return step


def reseed_after_layout_change(seed: int, step: int, topo) -> None:
    """Per-rank RNG streams do not survive a layout change: start them from (seed, step)."""
    from ..parallel import seed_everything

    seed_everything((seed * 1_000_003 + step) % (2**31 - 1), topo)


def check_global_batch(folder: str, meta: dict, global_batch: int) -> None:
    """The data position is a count of consumed samples and the sample order depends on the
    global batch: a resume must keep it (on any layout)."""
    saved = meta.get("global_batch")
    if saved is not None and saved != global_batch:
        raise ResumeError(
            f"{folder} was trained with a global batch of {saved} sequences, this job's is "
            f"{global_batch} (micro_batch_size x dp x grad_accum_steps); set "
            f"train.global_batch_size={saved} so the resumed run continues the same "
            f"optimisation and data order.")


def resume_on_new_layout(trainer, folder: str, meta: dict) -> None:
    """The trainer's resume when (tp, pp, dp, ZeRO stage) differ from the saved ones."""
    cfg, topo, pengine = trainer.cfg, trainer.topo, trainer.engine
    load_universal(pengine, folder)
    step = int(meta["step"])
    sched = pengine.engine.lr_scheduler
    if sched is not None:   # LambdaLR: last_epoch counts the optimizer steps taken
        sched.last_epoch = step - 1
        sched.step()
    pengine.engine.global_steps = step
    pengine.engine.global_samples = int(meta["consumed_samples"])
    pengine.step_count = step
    trainer.step, trainer.consumed_samples = step, int(meta["consumed_samples"])
    reseed_after_layout_change(cfg.train.seed, step, topo)
