"""Weight initialisation of every family (``model.init_method``; docs/families.md
"Initialisation").

``official`` (default) follows the code each family was published with:

* vanilla: Pythia's GPT-NeoX scheme (small_init std sqrt(2/(5d)) for inputs, embeddings and
  the head; wang_init std 2/(L*sqrt(d)) for the projections into the residual stream).
* recurrent families (ponderlm, adaponderlm, fixed_pruning, random_halting, loop, ponderlm2,
  ponderlm3): truncated normal (cut at +-3 sigma) with sigma = sqrt(2/(5d)) for every linear
  layer and embedding; attention-out and MLP-out get sigma / sqrt(2*L*(K+1)), K+1 being the
  passes (vertical) or stages (latent) of the stack. This is ``_init_weights`` of the official
  PonderLM and PonderLM-2 GPT-NeoX files (the loop baseline's NeoX file uses the same factor).
  ``ponder.depth_scaled_init=false`` drops the (K+1).
* pause: the same truncated normal with sigma / sqrt(2*L): one pass over a longer sequence,
  so no depth factor (the Llama pause file of PonderLM-2; its NeoX file keeps Hugging Face's
  normal(0.02), i.e. ``init_method: normal``).

On the llama backbone ``official`` is the Llama files of PonderLM-2 for every family,
vanilla included: the truncated normal with sigma = sqrt(2/(5d)), o_proj and down_proj at
sigma / sqrt(2*L), times the same 1/sqrt(K+1) depth factor for the recurrent families as on
neox (the published Llama files leave the depth factor out; ``ponder.depth_scaled_init=false``
reproduces them exactly). RMSNorm weights start at one.

``small_init_wang`` and ``normal`` are the previous schemes, kept by name; for them the
recurrent families divide the output projections by sqrt(K+1) when ``depth_scaled_init``.
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


def init_stds(cfg, ponder, family: str) -> tuple[str, float, float]:
    """(distribution 'normal' | 'trunc_normal', input std, output-projection std) of a family."""
    d, n_layers = cfg.hidden_size, cfg.num_layers
    depth = depth_passes(family, ponder) if ponder.depth_scaled_init else 1
    method = cfg.init_method
    if method == "official" and family_spec(family).plain_backbone and cfg.backbone == "neox":
        method = "small_init_wang"
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
