"""The DeepSpeed engine for a single-device-layout model (data parallel with ZeRO 0-3).

The DeepSpeed JSON is *derived* from the megaponder config, never written by hand, so the
two cannot disagree. Gradient clipping is always set explicitly: DeepSpeed 0.19 silently
defaults it to 1.0.
"""
from __future__ import annotations

import torch

from ..config import Config
from .schedule import lr_multiplier


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**9,  # megaponder does the logging
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
    }
    if p.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """GPT-NeoX's split: no weight decay on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model: torch.nn.Module, cfg: Config, dp_size: int, mpu=None):
    """``deepspeed.initialize`` with a torch AdamW and our schedule; returns the engine."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr,
                                  betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.train.steps, o))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp_size), mpu=mpu)
    return engine
