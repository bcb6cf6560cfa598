"""The GPT-NeoX/Pythia decoder in plain torch: numerically equal to Hugging Face's
``GPTNeoXForCausalLM`` with the same weights (tests/test_hf_parity.py).

Single device, no knowledge of ranks: megaponder/parallel turns these modules into their
tensor/pipeline-parallel forms. The stack exposes one primitive that every pondering family
wraps (``NeoXStack.forward``): run all layers over given input embeddings, positions and an
:class:`AttentionSpec`, optionally letting a ``kv_hook`` replace each layer's keys/values
(AdaPonderLM's KV reuse, KV caches at inference).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelConfig
from .attention import AttentionSpec, attention, resolve_backend

#: kv_hook(layer_index, k, v) -> (k, v): keys/values the layer should attend to. k/v arrive
#: as [B, H, T, D] for the rows being computed and may come back longer (a cache prepended).
KVHook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``rotary_pct`` of each head's dimensions."""

    def __init__(self, head_dim: int, rotary_pct: float, base: float):
        super().__init__()
        self.rotary_dim = int(head_dim * rotary_pct)
        self.base = base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        dim = self.rotary_dim
        return 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))

    def reset_inv_freq(self) -> None:
        """Recompute the (unsaved) frequencies, e.g. after a loader built the module on the
        meta device (transformers' from_pretrained)."""
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = self._inv_freq(device)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, T] -> cos, sin [B, 1, T, rotary_dim] (computed in fp32)."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == 0:
            return x
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, keep], dim=-1)


class NeoXAttention(nn.Module):
    """Fused QKV projection with GPT-NeoX's per-head [q|k|v] row layout."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_pct, cfg.rotary_base)
        self.backend = resolve_backend(cfg.attention_backend)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x, cos, sin, spec: AttentionSpec, kv_hook: Optional[KVHook] = None):
        qkv = self.qkv(x)
        b, t = qkv.shape[:2]   # from the projection: a sequence-parallel x is only a shard
        # [B, T, H, 3D] -> three [B, H, T, D]; the per-head interleave is NeoX's layout.
        q, k, v = qkv.view(b, t, self.num_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if kv_hook is not None:
            k, v = kv_hook(self.layer_index, k, v)
        ctx = attention(q, k, v, spec, backend=self.backend,
                        dropout_p=self.dropout_p if self.training else 0.0)
        return self.out(ctx.transpose(1, 2).reshape(b, t, -1)), (k, v)


class NeoXMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class NeoXLayer(nn.Module):
    #: how megaponder/parallel shards this layer over tensor-parallel ranks
    TP_PLAN = {"attn.qkv": "column", "attn.out": "row", "mlp.fc1": "column", "mlp.fc2": "row"}

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = NeoXAttention(cfg, layer_index)
        self.mlp = NeoXMLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, cos, sin, spec: AttentionSpec, kv_hook: Optional[KVHook] = None):
        attn_out, kv = self.attn(self.ln_attn(x), cos, sin, spec, kv_hook)
        attn_out = self.dropout(attn_out)
        if self.parallel_residual:
            return x + attn_out + self.dropout(self.mlp(self.ln_mlp(x))), kv
        x = x + attn_out
        return x + self.dropout(self.mlp(self.ln_mlp(x))), kv


class LayerStack(nn.Module):
    """A backbone's shared-weight layer stack plus final norm: the one recurrence primitive
    every family wraps, whatever the backbone (NeoXStack, LlamaStack subclass it with their
    layers and norm)."""

    def __init__(self, layers: list[nn.Module], final_norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                spec: Optional[AttentionSpec] = None, kv_hook: Optional[KVHook] = None,
                apply_final_norm: bool = True):
        """Returns (final-norm hidden [B, T, d], per-layer (k, v) as attended — with the
        backbone's key/value head count, before any grouped-query repeat).

        ``apply_final_norm=False`` returns the pre-norm residual stream instead (the loop
        baseline feeds it back into the stack; ``self.final_norm`` can be applied later)."""
        spec = spec or AttentionSpec()
        cos, sin = self.layers[0].attn.rotary.cos_sin(position_ids, inputs_embeds.dtype)
        x, kvs = inputs_embeds, []
        for layer in self.layers:
            x, kv = layer(x, cos, sin, spec, kv_hook)
            kvs.append(kv)
        return (self.final_norm(x) if apply_final_norm else x), kvs


class NeoXStack(LayerStack):
    """GPT-NeoX layers plus the final LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__([NeoXLayer(cfg, i) for i in range(cfg.num_layers)],
                         nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps))
