"""Weight initialisation of every family (``model.init_method``; docs/families.md
"Initialisation").

Every scheme applies to every family of a comparison, vanilla included, so a gap between two
families is never an initialisation gap. Only the depth factor differs per family: the output
projections (attention-out, MLP-out) of a family that runs the shared stack K+1 times are
divided by sqrt(K+1) where the paper's code does so.

``official`` (default): the truncated normal (cut at +-3 sigma) of the official PonderLM and
PonderLM-2 code, sigma = sqrt(2/(5d)) for every linear layer and embedding, attention-out and
MLP-out sigma / sqrt(2*L*D), D the depth factor:

* neox: D = K+1 for the recurrent families (ponderlm, adaponderlm, fixed_pruning,
  random_halting, loop, ponderlm2, ponderlm3; ``_init_weights`` of the official PonderLM and
  PonderLM-2 GPT-NeoX files), D = 1 for vanilla and pause (one pass).
* llama: D = 1 for every family (PonderLM's and PonderLM-2's Llama files, vanilla, loop and
  pause files included, have no depth factor).

``ponder.depth_scaled_init`` overrides the code's choice: true gives every recurrent family
D = K+1 on either backbone, false gives D = 1. With K = 0 every family's shared modules start
bit-equal to vanilla's under the same scheme and seed (tests/test_fidelity.py).

``small_init_wang`` (Pythia's own GPT-NeoX scheme: normal sqrt(2/(5d)) inputs, wang_init
2/(L sqrt(d)) output projections) and ``normal`` (``init_std`` everywhere) are the other
schemes; the recurrent families divide their output projections by sqrt(D) with the same D.
Gate and router MLPs initialise themselves (megaponder/models/ponder.py ``GateMLP``).
"""
from __future__ import annotations

import math

import torch.nn as nn

from .spec import family_spec


def depth_passes(family: str, ponder) -> int:
    """The K+1 of the depth factor: passes of the shared stack (1 for vanilla and pause;
    FamilySpec.recurrent says which)."""
    return ponder.steps + 1 if family_spec(family).recurrent else 1


def depth_factor(cfg, ponder, family: str) -> int:
    """D of the output projections' sigma / sqrt(2*L*D): K+1 for a recurrent family where its
    paper's code scales by depth (the GPT-NeoX files), 1 elsewhere (the Llama files, vanilla,
    pause); ``ponder.depth_scaled_init`` true/false overrides the backbone's default."""
    scaled = ponder.depth_scaled_init
    if scaled is None:
        scaled = cfg.backbone == "neox"
    return depth_passes(family, ponder) if scaled else 1


def init_stds(cfg, ponder, family: str) -> tuple[str, float, float]:
    """(distribution 'normal' | 'trunc_normal', input std, output-projection std) of a family."""
    d, n_layers = cfg.hidden_size, cfg.num_layers
    depth = depth_factor(cfg, ponder, family)
    method = cfg.init_method
    if method == "official":
        sigma = math.sqrt(2.0 / (5.0 * d))
        return "trunc_normal", sigma, sigma / math.sqrt(2.0 * n_layers * depth)
    if method == "small_init_wang":
        in_std, out_std = math.sqrt(2.0 / (5.0 * d)), 2.0 / (n_layers * math.sqrt(d))
    else:
        in_std = out_std = cfg.init_std
    return "normal", in_std, out_std / math.sqrt(depth)


def _fill(weight, dist: str, std: float) -> None:
    if dist == "trunc_normal":
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3.0 * std, b=3.0 * std)
    else:
        nn.init.normal_(weight, mean=0.0, std=std)


def init_backbone_weights(model: nn.Module, cfg, ponder, family: str) -> None:
    """Initialise embed_in, the backbone stack and the head of ``model`` for ``family``."""
    from .backbones import backbone_spec

    spec = backbone_spec(cfg.backbone)
    dist, in_std, out_std = init_stds(cfg, ponder, family)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            _fill(module.weight, dist, out_std if name.endswith(spec.output_projections) else in_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _fill(module.weight, dist, in_std)
        elif isinstance(module, spec.norm_classes):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
