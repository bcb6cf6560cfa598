"""The backbone registry (``model.backbone``): everything the rest of megaponder needs to know
about a decoder backbone, in one place per backbone.

A :class:`BackboneSpec` names the stack class (the recurrence primitive every family wraps),
its layer class (whose ``TP_PLAN`` the parallel code reads), the names of the projections into
the residual stream (the init's output projections), the per-layer matmul shapes the FLOPs
formulas count, and the config rules. A new backbone is one module with its stack plus one
:func:`register_backbone` call here (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .llama import LlamaLayer, LlamaStack, RMSNorm
from .neox import NeoXLayer, NeoXStack


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    stack_cls: type[nn.Module]
    layer_cls: type[nn.Module]
    #: module-name suffixes of the projections that write into the residual stream; the
    #: official inits scale these by 1/sqrt(2 L (K+1)) (models/init.py)
    output_projections: tuple[str, ...]
    #: norm module classes (weight set to one, bias, if any, to zero at init)
    norm_classes: tuple[type[nn.Module], ...]
    #: cfg -> list of (in_features, out_features) of every matmul of one layer (no attention
    #: scores): the forward FLOPs of a layer's linears are 2 * tokens * sum(in * out)
    layer_matmuls: Callable
    #: cfg -> list of one-line problems (empty when the model section is valid)
    problems: Callable


def _neox_matmuls(m) -> list[tuple[int, int]]:
    d, f = m.hidden_size, m.ffn_size
    return [(d, 3 * d), (d, d), (d, f), (f, d)]


def _llama_matmuls(m) -> list[tuple[int, int]]:
    d, f, kv = m.hidden_size, m.ffn_size, m.kv_heads * m.head_dim
    # q, k, v (GQA: k and v smaller), o; SwiGLU: gate, up, down
    return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]


def _neox_problems(m) -> list[str]:
    if m.num_kv_heads is not None and m.num_kv_heads != m.num_heads:
        return [f"model.num_kv_heads={m.num_kv_heads} needs model.backbone=llama (GPT-NeoX has "
                f"no grouped-query attention); remove it or set it to num_heads."]
    return []


def _llama_problems(m) -> list[str]:
    out = []
    if m.num_kv_heads is not None and (m.num_kv_heads <= 0 or m.num_heads % m.num_kv_heads):
        out.append(f"model.num_kv_heads={m.num_kv_heads} must be a positive divisor of "
                   f"model.num_heads={m.num_heads} (grouped-query attention shares each key/value "
                   f"head among num_heads/num_kv_heads query heads).")
    if m.rotary_pct != 1.0:
        out.append(f"model.backbone=llama rotates every head dimension: set model.rotary_pct=1.0 "
                   f"(got {m.rotary_pct}).")
    if m.parallel_residual:
        out.append("model.backbone=llama uses the sequential residual: set "
                   "model.parallel_residual=false.")
    if m.head_dim % 2:
        out.append(f"model.backbone=llama needs an even head dimension for rotary (hidden_size/"
                   f"num_heads = {m.head_dim}).")
    return out


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register_backbone(BackboneSpec("neox", NeoXStack, NeoXLayer, ("attn.out", "mlp.fc2"),
                               (nn.LayerNorm,), _neox_matmuls, _neox_problems))
register_backbone(BackboneSpec("llama", LlamaStack, LlamaLayer, ("attn.o_proj", "mlp.down_proj"),
                               (RMSNorm,), _llama_matmuls, _llama_problems))


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r} is unknown; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name]


def backbone_problems(m) -> list[str]:
    """Config problems of the model section's backbone (megaponder/train/preflight.py)."""
    if m.backbone not in BACKBONES:
        return [f"model.backbone={m.backbone!r} is unknown; choose one of {sorted(BACKBONES)}."]
    return BACKBONES[m.backbone].problems(m)


def build_stack(cfg) -> nn.Module:
    return backbone_spec(cfg.backbone).stack_cls(cfg)
