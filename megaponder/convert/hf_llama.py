"""Hugging Face ``LlamaForCausalLM`` <-> megaponder (``model.backbone: llama``) mapping.

megaponder's LLaMA stack keeps Hugging Face's separate q/k/v/o and gate/up/down projections
and its rotate-half rotary layout, so tensors move unchanged; only names differ.
megaponder/convert/hf.py dispatches here by ``model_type`` / ``model.backbone``.
"""
from __future__ import annotations

from typing import Iterable

from ..config import ModelConfig

_LAYER_MAP = [
    ("stack.layers.{i}.ln_attn.weight", "model.layers.{i}.input_layernorm.weight"),
    ("stack.layers.{i}.ln_mlp.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("stack.layers.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("stack.layers.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("stack.layers.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("stack.layers.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("stack.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("stack.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("stack.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
]
_GLOBAL_MAP = [
    ("embed_in.weight", "model.embed_tokens.weight"),
    ("stack.final_norm.weight", "model.norm.weight"),
    ("embed_out.weight", "lm_head.weight"),
]


def llama_name_pairs(num_layers: int) -> Iterable[tuple[str, str]]:
    yield from _GLOBAL_MAP
    for i in range(num_layers):
        for ours, theirs in _LAYER_MAP:
            yield ours.format(i=i), theirs.format(i=i)


def model_config_from_llama(hf_config) -> ModelConfig:
    """The megaponder backbone shape of a ``LlamaConfig``; refuses what the llama backbone
    does not compute (biases, another activation, scaled rope, a non-default head_dim)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    problems = []
    if rope_type != "default":
        problems.append(f"rope_type='{rope_type}' (only unscaled rotary is supported)")
    if (act := getattr(hf_config, "hidden_act", "silu")) != "silu":
        problems.append(f"hidden_act='{act}' (only 'silu' SwiGLU is supported)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            problems.append(f"{flag}=true (the llama backbone has no biases)")
    d, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * heads != d:
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads={d // heads}")
    if problems:
        raise ValueError("this LlamaForCausalLM cannot be converted: " + "; ".join(problems))
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    return ModelConfig(
        backbone="llama",
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=hf_config.vocab_size,
        hidden_size=d,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=None if kv == heads else kv,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        rotary_pct=1.0,
        rotary_base=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        parallel_residual=False,
        layernorm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def llama_config_from_model_config(cfg: ModelConfig, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.padded_vocab(), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.layernorm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, **extra,
    )
