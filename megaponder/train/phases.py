"""``train.phases``: a phase schedule inside one run (continued pretraining: gate-only, then
joint training), with phase lengths as token budgets.

    phases:
      - {tokens: 1.0e9, freeze_backbone: true, lr: 1.0e-3}   # AdaPonderLM's gate phase
      - {tokens: null}                                        # joint training to train.steps

A phase of T tokens lasts ceil(T / (global batch x seq_length)) optimizer steps; the phase of
a step is a function of the step alone, so a resume anywhere (also across a boundary, also on
another layout) continues the same schedule.

Freezing. Every parameter stays in the optimizer for the whole run (DeepSpeed partitions the
optimizer state once, at start-up; ZeRO cannot take parameters in later). In a
``freeze_backbone`` phase the backbone's parameter groups get learning rate 0 and a gradient
hook replaces the backbone's gradients by zeros, so that

* AdamW leaves the backbone bit-identical: with lr = 0 both the update and the decoupled
  weight decay (``p *= 1 - lr * wd``) are exact no-ops (decay alone would shrink a frozen
  weight with a non-zero lr even at zero gradient);
* gradient clipping sees the trained parameters' norm only, as if the backbone had
  ``requires_grad=False`` (what ``ponder.freeze_backbone`` does for a whole run);
* the backbone's Adam moments stay zero until it trains. Adam's step count is shared by the
  parameter group partitions, so the backbone's first updates of the next phase see bias
  corrections already near 1: they start at about (1-beta1)/sqrt(1-beta2) ~ 0.45 of a full
  step and reach it within ~1/(1-beta1) steps, a short built-in warm-up.

The backbone's weight-gradient matmuls still run in a frozen phase (about a third of the
backward); the gates sit at every iteration, so the backward through the backbone is needed
anyway.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import Config, ConfigError


def phase_bounds(cfg: Config, tokens_per_step: int) -> list[tuple[int, int]]:
    """[start, end) optimizer steps of every phase; the last one runs to train.steps."""
    bounds, start = [], 0
    phases = cfg.train.phases
    for i, phase in enumerate(phases):
        if i == len(phases) - 1:
            end = max(cfg.train.steps, start)
        else:
            end = start + math.ceil(phase.tokens / tokens_per_step)
        bounds.append((start, end))
        start = end
    return bounds


class PhaseSchedule:
    """Applies ``train.phases`` to a built engine: call :meth:`apply` before every step."""

    def __init__(self, cfg: Config, pengine, tokens_per_step: int):
        self.cfg, self.pengine = cfg, pengine
        self.phases = cfg.train.phases
        self.bounds = phase_bounds(cfg, tokens_per_step)
        model = pengine.module
        extras = set(model.extra_parameter_names())
        if any(p.freeze_backbone for p in self.phases) and not extras:
            raise ConfigError(f"train.phases freezes the backbone, but family "
                              f"'{cfg.model.family}' has no gate/router parameters to train "
                              f"alone; drop freeze_backbone from its phases.")
        self.frozen = False
        self._hooks = [p.register_hook(self._grad_hook)
                       for name, p in model.named_parameters()
                       if name not in extras and p.requires_grad]
        # the groups engine.param_groups(split=...) built: ZeRO swaps their "params" for flat
        # partitions but keeps the dicts, so the tag survives
        groups = _torch_optimizer(pengine).param_groups
        if any("backbone" not in g for g in groups):
            raise RuntimeError("train.phases needs the optimizer's parameter groups split into "
                               "backbone and family parameters (megaponder.train.engine.param_groups)")
        self.backbone_groups = [g["backbone"] for g in groups]

    def _grad_hook(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        return torch.zeros_like(grad) if self.frozen else grad

    def index(self, step: int) -> int:
        for i, (start, end) in enumerate(self.bounds):
            if step < end:
                return i
        return len(self.bounds) - 1

    def apply(self, step: int) -> int:
        """Set freezing and learning rates for the update made at ``step`` (0-based, = steps
        done so far). Idempotent: every group's lr is recomputed from the scheduler's base lr,
        so a resumed optimizer state (which holds the last lr set) does not compound it."""
        i = self.index(step)
        phase = self.phases[i]
        self.frozen = phase.freeze_backbone
        sched = self.pengine.engine.lr_scheduler
        groups = _torch_optimizer(self.pengine).param_groups
        factor = (phase.lr / self.cfg.optim.lr) if phase.lr is not None else 1.0
        for g, base, fn, backbone in zip(groups, sched.base_lrs, sched.lr_lambdas, self.backbone_groups):
            g["lr"] = 0.0 if (backbone and self.frozen) else base * fn(step) * factor
        return i


def _torch_optimizer(pengine):
    from .reshard import _inner_optimizer
    return _inner_optimizer(pengine.engine)
