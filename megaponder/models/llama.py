"""The LLaMA decoder in plain torch: numerically equal to Hugging Face's ``LlamaForCausalLM``
with the same weights (tests/test_llama.py).

RMSNorm, SwiGLU MLP, full rotary (theta = ``model.rotary_base``), no biases, untied head and
optional grouped-query attention (``model.num_kv_heads`` key/value heads shared by
``num_heads // num_kv_heads`` query heads each). :class:`LlamaStack` exposes the same
recurrence primitive as :class:`~megaponder.models.neox.NeoXStack`, so every pondering family
runs unchanged on either backbone.

GQA: ``kv_hook`` (KV caches, AdaPonderLM's KV reuse) and the returned per-layer ``(k, v)`` see
the *small* tensors with ``num_kv_heads`` heads; the heads are repeated only right before the
attention kernel, so caches store ``num_kv_heads`` heads and every backend in
models/attention.py gets the equal head counts it expects.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelConfig
from .attention import AttentionSpec, attention, resolve_backend
from .neox import KVHook, LayerStack, RotaryEmbedding


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in fp32 (as Hugging Face's LlamaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, Hk * n_rep, T, D], each key/value head repeated for its group of
    query heads (query head h uses kv head h // n_rep, Hugging Face's layout)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class LlamaAttention(nn.Module):
    """Separate q/k/v/o projections without bias; ``num_kv_heads`` <= ``num_heads``."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.num_kv_heads = cfg.kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, 1.0, cfg.rotary_base)
        self.backend = resolve_backend(cfg.attention_backend)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x, cos, sin, spec: AttentionSpec, kv_hook: Optional[KVHook] = None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        b, t = q.shape[:2]
        # head counts come from the projections: tensor parallelism shards them
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if kv_hook is not None:
            k, v = kv_hook(self.layer_index, k, v)
        n_rep = q.shape[1] // k.shape[1]
        ctx = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), spec, backend=self.backend,
                        dropout_p=self.dropout_p if self.training else 0.0)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, -1)), (k, v)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """Pre-norm sequential residual: x + attn(norm(x)), then + mlp(norm(x))."""

    #: how megaponder/parallel shards this layer over tensor-parallel ranks
    TP_PLAN = {"attn.q_proj": "column", "attn.k_proj": "column", "attn.v_proj": "column",
               "attn.o_proj": "row", "mlp.gate_proj": "column", "mlp.up_proj": "column",
               "mlp.down_proj": "row"}

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.ln_attn = RMSNorm(cfg.hidden_size, cfg.layernorm_eps)
        self.ln_mlp = RMSNorm(cfg.hidden_size, cfg.layernorm_eps)
        self.attn = LlamaAttention(cfg, layer_index)
        self.mlp = LlamaMLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, cos, sin, spec: AttentionSpec, kv_hook: Optional[KVHook] = None):
        attn_out, kv = self.attn(self.ln_attn(x), cos, sin, spec, kv_hook)
        x = x + self.dropout(attn_out)
        return x + self.dropout(self.mlp(self.ln_mlp(x))), kv


class LlamaStack(LayerStack):
    """LLaMA layers plus the final RMSNorm (NeoXStack's recurrence primitive, LayerStack)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__([LlamaLayer(cfg, i) for i in range(cfg.num_layers)],
                         RMSNorm(cfg.hidden_size, cfg.layernorm_eps))
