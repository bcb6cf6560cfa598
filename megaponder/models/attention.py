"""One attention API, several kernels.

Every model in megaponder calls :func:`attention` with queries/keys/values shaped
``[batch, heads, len, head_dim]`` and an :class:`AttentionSpec` that describes the mask in
*index space*: query ``i`` sits at key index ``q_index[i]``; with ``causal`` it may see keys
``j <= q_index[i]``. That one rule covers ordinary training (``q_index = arange``), decoding
with a KV cache (queries at the end of a longer key sequence), and compacted inference where
only the still-active tokens are queries (``q_index`` = their positions). Document masks
(``segment_ids``), key padding and an additive key-side bias (PonderLM-3's log-survival) compose
with it. Compacted training goes one step further (``flat_queries``): the packed tokens of all
rows arrive as one flat [1, H, N, D] block with no padding and :func:`attention` lays them
out as [B, H, A, D] rows (A = the longest row) for the kernel only.

Backends: ``eager`` is the reference math; ``sdpa`` is torch's fused kernel (``is_causal``
for plain causal attention, so CUDA runs its flash / cuDNN kernel; the additive mask
otherwise); ``flex`` (FlexAttention, block-sparse, every mask without a dense one) and
``flash`` (flash-attn, causal and packed documents) are optional fast paths added by
megaponder.models.kernels when available; ``auto`` picks one per call. Every backend is
tested against ``eager``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .compat import check_torch

check_torch()


@dataclass
class AttentionSpec:
    """What each query may attend to. All fields optional; the default is plain causal."""

    causal: bool = True
    #: key index of each query, [Tq] or [B, Tq]; None means queries are the last Tq keys.
    q_index: Optional[torch.Tensor] = None
    #: [B, Tk] bool, True for real keys (False = padding).
    key_padding_mask: Optional[torch.Tensor] = None
    #: [B, Tk] document/segment id of each key; queries take theirs via q_index.
    segment_ids: Optional[torch.Tensor] = None
    #: additive bias broadcastable to [B, H, Tq, Tk] (e.g. [B, 1, 1, Tk] log-survival).
    key_bias: Optional[torch.Tensor] = None
    #: queries come flattened over rows (see :class:`FlatQueries`); q_index is then [B, A].
    flat_queries: Optional["FlatQueries"] = None

    def cached(self, key: tuple, build):
        """``build()`` once per spec and key: the spec object is shared by every layer of a
        stack call, so masks, block masks and cu_seqlens are built once per forward, not once
        per layer."""
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def is_end_aligned_causal(self) -> bool:
        """Causal with queries at the end of the keys (training, or decoding with a KV cache)
        and no other mask: what flash_attn_func(causal=True) computes."""
        return (self.causal and self.q_index is None and self.key_padding_mask is None
                and self.segment_ids is None and self.key_bias is None)

    def is_plain_causal(self, tq: int, tk: int) -> bool:
        return self.is_end_aligned_causal() and tq == tk

    def query_index(self, batch: int, tq: int, tk: int, device) -> torch.Tensor:
        """[B, Tq] key-space index of each query."""
        if self.q_index is None:
            idx = torch.arange(tk - tq, tk, device=device)
        else:
            idx = self.q_index.to(device)
        return idx.expand(batch, tq) if idx.dim() == 1 else idx

    def allowed(self, batch: int, tq: int, tk: int, device) -> Optional[torch.Tensor]:
        """[B, 1, Tq, Tk] bool of permitted (query, key) pairs, or None if all are permitted."""
        allowed = None
        q_idx = self.query_index(batch, tq, tk, device)
        if self.causal:
            k_idx = torch.arange(tk, device=device)
            allowed = k_idx.view(1, 1, tk) <= q_idx.unsqueeze(-1)
        if self.segment_ids is not None:
            seg_k = self.segment_ids.to(device)
            seg_q = torch.gather(seg_k, 1, q_idx)
            same = seg_q.unsqueeze(-1) == seg_k.unsqueeze(1)
            allowed = same if allowed is None else allowed & same
        if self.key_padding_mask is not None:
            keep = self.key_padding_mask.to(device).bool().unsqueeze(1)
            allowed = keep.expand(batch, tq, tk) if allowed is None else allowed & keep
        return None if allowed is None else allowed.unsqueeze(1)

    def additive_mask(self, batch: int, tq: int, tk: int, dtype, device) -> Optional[torch.Tensor]:
        """Float mask for kernels that take one: 0 where allowed, a large negative otherwise,
        plus ``key_bias``. A finite minimum (not -inf) keeps fully masked rows (padding
        queries) finite instead of NaN, as Hugging Face does."""
        allowed = self.allowed(batch, tq, tk, device)
        mask = None
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        if self.key_bias is not None:
            bias = self.key_bias.to(device=device, dtype=dtype)
            mask = bias if mask is None else mask + bias
            if allowed is not None:  # a bias must not lift a masked pair back out of -inf land
                mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return mask


@dataclass
class FlatQueries:
    """Where the flat queries of compacted training sit in the kernel's [B, A] row layout.
    ``to_rows`` [B*A]: the flat query of each row slot (a padding slot repeats query 0; its
    output is never read); ``from_rows`` [N]: the row slot of each flat query."""

    to_rows: torch.Tensor
    from_rows: torch.Tensor

    def rows(self, q: torch.Tensor, batch: int, width: int) -> torch.Tensor:
        """[1, H, N, D] -> [B, H, A, D]."""
        h, d = q.shape[1], q.shape[-1]
        return q[0].transpose(0, 1).index_select(0, self.to_rows).view(batch, width, h, d).transpose(1, 2)

    def flat(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, A, D] -> [1, H, N, D]."""
        b, h, a, d = out.shape
        flat = out.transpose(1, 2).reshape(b * a, h, d).index_select(0, self.from_rows)
        return flat.transpose(0, 1).unsqueeze(0)


AttentionFn = Callable[..., torch.Tensor]


def eager_attention(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
    b, _, tq, _ = q.shape
    tk = k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = _shared_mask(spec, b, tq, tk, scores.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
    b, _, tq, _ = q.shape
    tk = k.shape[-2]
    if spec.is_plain_causal(tq, tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    if tq == 1 and spec.is_end_aligned_causal():   # one decoded token after its cache: every key visible
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    mask = _shared_mask(spec, b, tq, tk, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _shared_mask(spec: AttentionSpec, b: int, tq: int, tk: int, dtype, device):
    """spec.additive_mask, built once for all the layers of a stack call. Rebuilt per call
    inside a compiled layer (a cache lookup there would be a guard) and when a key bias
    carries a gradient (an activation-checkpoint recompute must rebuild the same graph)."""
    if torch.compiler.is_compiling() or (spec.key_bias is not None and spec.key_bias.requires_grad):
        return spec.additive_mask(b, tq, tk, dtype, device)
    return spec.cached(("additive", b, tq, tk, dtype, str(device)),
                       lambda: spec.additive_mask(b, tq, tk, dtype, device))


_BACKENDS: dict[str, AttentionFn] = {"eager": eager_attention, "sdpa": sdpa_attention}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Optional kernels (flex, flash) and ``auto`` register themselves here when
    megaponder.models.kernels is imported (models/base.py does, so every built model sees
    them; code that lists backends without building a model imports kernels itself)."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"attention backend '{name}' is not available on this machine; "
                         f"available: {available_backends()}. Set model.attention_backend to one of them.")
    return name


def attention(q, k, v, spec: AttentionSpec, *, backend: str = "sdpa", dropout_p: float = 0.0,
              scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask(spec)) v with the chosen kernel; shapes [B, H, T, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kernel = _BACKENDS[backend]
    if spec.flat_queries is None:
        return kernel(q, k, v, spec, scale, dropout_p)
    batch, width = spec.q_index.shape
    rows = kernel(spec.flat_queries.rows(q, batch, width), k, v, spec, scale, dropout_p)
    return spec.flat_queries.flat(rows)
