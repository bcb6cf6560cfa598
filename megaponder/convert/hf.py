"""Hugging Face ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` <-> megaponder parameter mapping,
in one place (the Llama names live in megaponder/convert/hf_llama.py; the functions here
dispatch on ``model_type`` / ``model.backbone``).

Tools (tools/convert_checkpoint.py) and tests share it. megaponder keeps GPT-NeoX's fused QKV
with its per-head [q|k|v] row layout, so the tensors move unchanged; only names differ.
(Megatron-style tensor-parallel splitting happens afterwards, in megaponder/parallel.)
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from ..config import ModelConfig

# (megaponder name, Hugging Face name); {i} is the layer index.
_LAYER_MAP = [
    ("stack.layers.{i}.ln_attn.weight", "gpt_neox.layers.{i}.input_layernorm.weight"),
    ("stack.layers.{i}.ln_attn.bias", "gpt_neox.layers.{i}.input_layernorm.bias"),
    ("stack.layers.{i}.ln_mlp.weight", "gpt_neox.layers.{i}.post_attention_layernorm.weight"),
    ("stack.layers.{i}.ln_mlp.bias", "gpt_neox.layers.{i}.post_attention_layernorm.bias"),
    ("stack.layers.{i}.attn.qkv.weight", "gpt_neox.layers.{i}.attention.query_key_value.weight"),
    ("stack.layers.{i}.attn.qkv.bias", "gpt_neox.layers.{i}.attention.query_key_value.bias"),
    ("stack.layers.{i}.attn.out.weight", "gpt_neox.layers.{i}.attention.dense.weight"),
    ("stack.layers.{i}.attn.out.bias", "gpt_neox.layers.{i}.attention.dense.bias"),
    ("stack.layers.{i}.mlp.fc1.weight", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight"),
    ("stack.layers.{i}.mlp.fc1.bias", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias"),
    ("stack.layers.{i}.mlp.fc2.weight", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight"),
    ("stack.layers.{i}.mlp.fc2.bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias"),
]
_GLOBAL_MAP = [
    ("embed_in.weight", "gpt_neox.embed_in.weight"),
    ("stack.final_norm.weight", "gpt_neox.final_layer_norm.weight"),
    ("stack.final_norm.bias", "gpt_neox.final_layer_norm.bias"),
    ("embed_out.weight", "embed_out.weight"),
]
# transformers >= 5 names the output head ``lm_head``; Pythia's files say ``embed_out``.
HF_HEAD_NAMES = ("embed_out.weight", "lm_head.weight")


#: Hugging Face model_type -> megaponder backbone
HF_MODEL_TYPES = {"gpt_neox": "neox", "llama": "llama"}


def hf_model_class(backbone: str):
    """The plain transformers class of a backbone."""
    import transformers

    return transformers.LlamaForCausalLM if backbone == "llama" else transformers.GPTNeoXForCausalLM


def name_pairs(num_layers: int, backbone: str = "neox") -> Iterable[tuple[str, str]]:
    if backbone == "llama":
        from .hf_llama import llama_name_pairs

        yield from llama_name_pairs(num_layers)
        return
    yield from _GLOBAL_MAP
    for i in range(num_layers):
        for ours, theirs in _LAYER_MAP:
            yield ours.format(i=i), theirs.format(i=i)


# Buffers Hugging Face keeps in some versions' state dicts (rotary caches, causal masks).
_HF_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attention\.(bias|masked_bias))$")


def model_config_from_hf(hf_config) -> ModelConfig:
    """The megaponder backbone shape of a ``GPTNeoXConfig`` or ``LlamaConfig``."""
    model_type = getattr(hf_config, "model_type", "gpt_neox")
    if model_type == "llama":
        from .hf_llama import model_config_from_llama

        return model_config_from_llama(hf_config)
    if model_type != "gpt_neox":
        raise ValueError(f"expected a GPT-NeoX (Pythia) or Llama checkpoint, got model_type="
                         f"'{hf_config.model_type}'")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rotary_pct = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000))
    if (hidden_act := getattr(hf_config, "hidden_act", "gelu")) != "gelu":
        raise ValueError(f"only hidden_act='gelu' (Pythia) is supported, got '{hidden_act}'")
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        parallel_residual=bool(hf_config.use_parallel_residual),
        layernorm_eps=float(hf_config.layer_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def hf_config_from_model_config(cfg: ModelConfig, **extra):
    if cfg.backbone == "llama":
        from .hf_llama import llama_config_from_model_config

        return llama_config_from_model_config(cfg, **extra)
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=cfg.padded_vocab(), hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size, max_position_embeddings=cfg.max_position_embeddings,
        rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base,
        use_parallel_residual=cfg.parallel_residual, layer_norm_eps=cfg.layernorm_eps,
        hidden_act="gelu", tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=True, hidden_dropout=0.0, attention_dropout=0.0, **extra,
    )


def hf_to_megaponder(hf_state: dict[str, torch.Tensor], num_layers: int,
                     backbone: str = "neox") -> dict[str, torch.Tensor]:
    """Rename a GPTNeoXForCausalLM (or, with ``backbone='llama'``, LlamaForCausalLM) state
    dict to megaponder's backbone names."""
    out, used = {}, set()
    for ours, theirs in name_pairs(num_layers, backbone):
        if theirs == HF_HEAD_NAMES[0] and theirs not in hf_state:
            theirs = HF_HEAD_NAMES[1]
        if theirs not in hf_state:
            raise KeyError(f"Hugging Face checkpoint lacks '{theirs}' (is it a "
                           f"{hf_model_class(backbone).__name__}?)")
        out[ours] = hf_state[theirs]
        used.add(theirs)
    leftover = [k for k in hf_state if k not in used and not _HF_IGNORED.search(k)]
    if leftover:
        raise KeyError(f"unexpected tensors in the Hugging Face checkpoint: {leftover[:5]}")
    return out


def megaponder_to_hf(state: dict[str, torch.Tensor], num_layers: int,
                     head_name: str = HF_HEAD_NAMES[0], backbone: str = "neox") -> dict[str, torch.Tensor]:
    """Backbone tensors under Hugging Face names (the NeoX head as ``head_name``, which is
    whatever the installed transformers calls it); family-specific extras are not included."""
    out = {theirs: state[ours] for ours, theirs in name_pairs(num_layers, backbone)}
    if backbone == "neox":
        out[head_name] = out.pop(HF_HEAD_NAMES[0])
    return out
