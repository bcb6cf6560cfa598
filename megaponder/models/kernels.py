"""Optional fast attention kernels, registered with megaponder.models.attention when their
dependencies import, and the ``auto`` policy that picks one per call.

* ``flex`` — torch FlexAttention. Expresses every AttentionSpec without a dense mask: causal
  by index (so AdaPonderLM's compacted queries — query rows = the active tokens, keys = every
  token with halted ones' reused K/V — are a ``mask_mod`` reading a [B, Tq] index table),
  documents and padding as a ``mask_mod``, PonderLM-3's log-survival key bias as a
  ``score_mod`` (a [B, Tk] lookup). The block mask is built once per forward (cached on the
  spec, which every layer shares) and fully masked blocks (other documents, the future) cost
  nothing. On CPU it runs forward only (torch has no FlexAttention backward on CPU), so CPU
  training steps use ``sdpa``; that forward is how the suite checks it against ``eager``.
* ``flash`` — flash-attn (GPU only, ``pip install 'megaponder[gpu]'``): plain causal
  attention (including queries aligned to the end of a longer KV cache) with
  ``flash_attn_func``, and packed documents with ``flash_attn_varlen_func`` (cu_seqlens
  from the segment ids). Other specs fall back to ``sdpa``.
* ``auto`` — per call, since the device and the mask are only known then (see
  :func:`choose_backend`), logging each (device, mask kind) -> backend choice once.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch

from .attention import _BACKENDS, AttentionSpec, register_backend, sdpa_attention

# optional dependency, imported here in a try block: the Hugging Face export copies this file,
# and transformers' loader accepts a missing package only when its import sits in a try block
try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:   # torch < 2.5
        return False
    return True


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


_compiled_flex = None


def _flex_kernel():
    """flex_attention must run compiled to be fast (eager mode materialises the scores).
    Inside an already compiled region (``model.compile``) the raw function is traced into
    the surrounding graph instead of nesting a second compile."""
    from torch.nn.attention.flex_attention import flex_attention

    if _is_compiling():
        return flex_attention
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_mask(spec: AttentionSpec, b: int, tq: int, tk: int, device):
    """The BlockMask of ``spec``: no [Tq, Tk] tensor is built, only the block-level
    summary create_block_mask evaluates from ``mask_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_idx_table = spec.query_index(b, tq, tk, device).contiguous()
    seg = spec.segment_ids.to(device) if spec.segment_ids is not None else None
    keep = spec.key_padding_mask.to(device).bool() if spec.key_padding_mask is not None else None
    causal = spec.causal

    def mask_mod(bi, hi, qi, ki):
        qpos = q_idx_table[bi, qi]
        allowed = ki >= 0
        if causal:
            allowed = allowed & (ki <= qpos)
        if seg is not None:
            allowed = allowed & (seg[bi, ki] == seg[bi, qpos])
        if keep is not None:
            allowed = allowed & keep[bi, ki]
        return allowed

    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=tq, KV_LEN=tk, device=device)


def flex_score_mod(spec: AttentionSpec, b: int, h: int, tq: int, tk: int, device):
    """The key bias as a score_mod. The usual PonderLM-3 bias is per key ([B, 1, 1, Tk]) and
    becomes a [B, Tk] lookup; any other broadcastable shape is expanded (a view, no copy)."""
    if spec.key_bias is None:
        return None
    bias = spec.key_bias.to(device=device, dtype=torch.float32)
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if bias.shape[1] == 1 and bias.shape[2] == 1:
        # contiguous: a captured buffer that requires grad (PonderLM-3's router) gets its
        # gradient scattered into it by the backward kernel, which a stride-0 view cannot take
        per_key = bias[:, 0, 0, :].expand(b, tk).contiguous()

        def score_mod(score, bi, hi, qi, ki):
            return score + per_key[bi, ki]
        return score_mod
    full = bias.expand(b, h, tq, tk)

    def score_mod(score, bi, hi, qi, ki):
        return score + full[bi, hi, qi, ki]
    return score_mod


_warned_flex_cpu_grad = False


def flex_attention_backend(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
    global _warned_flex_cpu_grad
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # torch has no FlexAttention backward on CPU: train with sdpa there.
        if not _warned_flex_cpu_grad:
            warnings.warn("flex backend: FlexAttention has no backward on CPU; using sdpa for "
                          "training steps on CPU (inference still uses flex)")
            _warned_flex_cpu_grad = True
        return sdpa_attention(q, k, v, spec, scale, dropout_p)
    if dropout_p > 0.0:
        raise ValueError("the flex backend has no attention dropout; set model.attention_dropout=0 "
                         "or model.attention_backend=sdpa")
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    block_mask = spec.cached(("flex", b, tq, tk, str(q.device)),
                             lambda: flex_block_mask(spec, b, tq, tk, q.device))
    score_mod = flex_score_mod(spec, b, h, tq, tk, q.device)
    return _flex_kernel()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


# -- flash-attn ----------------------------------------------------------------------------
def _flash_available() -> bool:
    return torch.cuda.is_available() and flash_attn_func is not None


def is_varlen_documents(spec: AttentionSpec, tq: int, tk: int) -> bool:
    """Packed documents in self-attention: what flash_attn_varlen_func expresses."""
    return (spec.causal and spec.segment_ids is not None and spec.q_index is None
            and spec.key_padding_mask is None and spec.key_bias is None and tq == tk)


def documents_cu_seqlens(segment_ids: torch.Tensor) -> tuple[Optional[torch.Tensor], int]:
    """[B, T] segment ids -> (int32 cu_seqlens over the B*T flattened tokens, longest run), or
    (None, 0) when some id comes back after another one (then a run is not one document and
    varlen would differ from the mask). A row boundary always starts a new sequence."""
    b, t = segment_ids.shape
    seg = segment_ids.long()
    change = torch.ones(b, t, dtype=torch.bool, device=seg.device)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    if t > 1 and bool((seg[:, 1:] < seg[:, :-1]).any()):
        # ids must not decrease along a row, or a repeated id could be two separate runs
        return None, 0
    starts = torch.nonzero(change.flatten(), as_tuple=False).flatten()
    cu = torch.cat([starts, torch.tensor([b * t], device=seg.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


_warned_flash_fallback = False


def flash_attention_backend(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
    global _warned_flash_fallback
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    half = q.dtype in (torch.float16, torch.bfloat16) and q.is_cuda
    if half and spec.is_end_aligned_causal():
        # flash-attn aligns a shorter query block to the end of the keys, as q_index=None does.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, softmax_scale=scale, causal=True)
        return out.transpose(1, 2)
    if half and is_varlen_documents(spec, tq, tk):
        cu, longest = spec.cached(("varlen", b, tq, str(q.device)),
                                  lambda: documents_cu_seqlens(spec.segment_ids.to(q.device)))
        if cu is not None:
            def packed(x):   # [B, H, T, D] -> [B*T, H, D]
                return x.transpose(1, 2).reshape(b * tq, h, d)
            out = flash_attn_varlen_func(packed(q), packed(k), packed(v), cu, cu, longest, longest,
                                         dropout_p=dropout_p, softmax_scale=scale, causal=True)
            return out.view(b, tq, h, d).transpose(1, 2)
    if not _warned_flash_fallback:
        warnings.warn("flash backend: this mask/dtype is not covered by flash-attn here; "
                      "using sdpa for it")
        _warned_flash_fallback = True
    return sdpa_attention(q, k, v, spec, scale, dropout_p)


# -- auto --------------------------------------------------------------------------------------
def mask_kind(spec: AttentionSpec, tq: int, tk: int) -> str:
    """A short name of what the spec asks for, for the auto policy and its log line."""
    if spec.is_plain_causal(tq, tk):
        return "causal"
    parts = []
    if spec.q_index is not None:
        parts.append("compacted_queries")
    elif tq != tk:
        parts.append("kv_cache")
    if not spec.causal:
        parts.append("non_causal")
    for name in ("segment_ids", "key_padding_mask", "key_bias"):
        if getattr(spec, name) is not None:
            parts.append({"segment_ids": "documents", "key_padding_mask": "padding",
                          "key_bias": "key_bias"}[name])
    return "+".join(parts) or "causal"


def choose_backend(q, spec: AttentionSpec, tk: int, dropout_p: float, available) -> str:
    """The auto policy.

    * CPU: ``sdpa`` for every mask (torch's CPU kernel is the fastest here; compiled flex on
      CPU has no backward and pays a compile per new shape).
    * CUDA, plain causal (or end-aligned KV cache): ``flash`` when flash-attn is installed and
      the dtype is half, else ``sdpa`` with ``is_causal`` (its flash / cuDNN kernel, no mask).
    * CUDA, packed documents only: ``flash`` (varlen) when installed and half.
    * CUDA, any other mask (compacted queries, key bias, padding, documents without
      flash-attn): ``flex`` (block sparse, no dense mask) when available and there is no
      attention dropout, else ``sdpa`` with a dense additive mask.
    """
    tq = q.shape[-2]
    if not q.is_cuda:
        return "sdpa"
    half = q.dtype in (torch.float16, torch.bfloat16)
    if spec.is_end_aligned_causal():
        return "flash" if "flash" in available and half else "sdpa"
    if is_varlen_documents(spec, tq, tk) and "flash" in available and half:
        return "flash"
    if "flex" in available and dropout_p == 0.0:
        return "flex"
    return "sdpa"


#: (device type, mask kind, dtype) -> backend, every choice auto has made (logged once each)
AUTO_CHOICES: dict[tuple, str] = {}


def make_auto_backend(backends: dict):
    def auto_attention(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
        name = choose_backend(q, spec, k.shape[-2], dropout_p, backends)
        if not _is_compiling():   # a print inside a compiled region would break the graph
            key = (q.device.type, mask_kind(spec, q.shape[-2], k.shape[-2]), str(q.dtype).split(".")[-1])
            if key not in AUTO_CHOICES:
                AUTO_CHOICES[key] = name
                if int(os.environ.get("RANK", "0")) == 0:
                    # stderr: stdout carries command output (generate's text, eval's JSON)
                    print(f"[megaponder] attention auto: {key[1]} on {key[0]} ({key[2]}) -> {name}",
                          file=sys.stderr, flush=True)
        return backends[name](q, k, v, spec, scale, dropout_p)
    return auto_attention


def register_optional_backends() -> None:
    if _flex_available():
        register_backend("flex", flex_attention_backend)
    if _flash_available():
        register_backend("flash", flash_attention_backend)
    # auto picks among the registered kernels per call (choose_backend)
    register_backend("auto", make_auto_backend(_BACKENDS))


register_optional_backends()
