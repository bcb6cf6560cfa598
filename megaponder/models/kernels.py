"""Optional fast attention kernels, registered with megaponder.models.attention when their
dependencies import.

* ``flex`` — torch FlexAttention, compiled. Expresses every AttentionSpec (causal by index,
  documents, padding as a ``mask_mod``; the PonderLM-3 key bias as a ``score_mod``) with
  block sparsity, so fully masked blocks (other documents, the future) cost nothing. Runs on
  CPU too (forward only: torch has no FlexAttention backward on CPU, so CPU training steps
  use ``sdpa``), which is how the suite checks it against ``eager``.
* ``flash`` — flash-attn (GPU only, ``pip install 'megaponder[gpu]'``). Covers plain causal
  attention, including queries aligned to the end of a longer KV cache; other specs fall back
  to ``sdpa``. Not verified on a GPU in this repository's CI.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .attention import AttentionSpec, register_backend, sdpa_attention


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_compiled_flex = None


def _flex_kernel():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


_warned_flex_cpu_grad = False


def flex_attention_backend(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
    from torch.nn.attention.flex_attention import create_block_mask

    global _warned_flex_cpu_grad
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # torch 2.13 has no FlexAttention backward on CPU: train with sdpa there.
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
    q_idx_table = spec.query_index(b, tq, tk, q.device)
    seg = spec.segment_ids.to(q.device) if spec.segment_ids is not None else None
    keep = spec.key_padding_mask.to(q.device).bool() if spec.key_padding_mask is not None else None

    def mask_mod(bi, hi, qi, ki):
        allowed = ki >= 0
        qpos = q_idx_table[bi, qi]
        if spec.causal:
            allowed = allowed & (ki <= qpos)
        if seg is not None:
            allowed = allowed & (seg[bi, ki] == seg[bi, qpos])
        if keep is not None:
            allowed = allowed & keep[bi, ki]
        return allowed

    score_mod = None
    if spec.key_bias is not None:
        bias = spec.key_bias.to(device=q.device, dtype=torch.float32)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(b, h, tq, tk)

        def score_mod(score, bi, hi, qi, ki):
            return score + bias[bi, hi, qi, ki]

    block_mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=tq, KV_LEN=tk, device=q.device)
    return _flex_kernel()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


_warned_flash_fallback = False


def flash_attention_backend(q, k, v, spec: AttentionSpec, scale: float, dropout_p: float = 0.0):
    global _warned_flash_fallback
    tq, tk = q.shape[-2], k.shape[-2]
    plain = (spec.causal and spec.q_index is None and spec.segment_ids is None
             and spec.key_padding_mask is None and spec.key_bias is None)
    if not plain or q.dtype not in (torch.float16, torch.bfloat16) or not q.is_cuda:
        if not _warned_flash_fallback:
            warnings.warn("flash backend: this mask/dtype is not covered by flash-attn here; "
                          "using sdpa for it")
            _warned_flash_fallback = True
        return sdpa_attention(q, k, v, spec, scale, dropout_p)
    from flash_attn import flash_attn_func

    # flash-attn aligns a shorter query block to the end of the keys, as our q_index=None does.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale, causal=True)
    return out.transpose(1, 2)


def register_optional_backends() -> None:
    if _flex_available():
        register_backend("flex", flex_attention_backend)
    if _flash_available():
        register_backend("flash", flash_attention_backend)
