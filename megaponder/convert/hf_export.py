"""Export a megaponder checkpoint of any family as a Hugging Face ``save_pretrained`` folder,
and import such a folder back.

* vanilla -> ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` by ``model.backbone`` (plain
  transformers, no remote code).
* every other family -> ``MegaponderForCausalLM``, ``trust_remote_code``: the folder holds
  ``configuration_megaponder.py`` / ``modeling_megaponder.py`` (copied from
  megaponder/convert/hf_remote/, torch + transformers only), ``config.json`` with ``auto_map``,
  ``model.safetensors`` under megaponder's own parameter names, and the tokenizer
  (megaponder/convert/tokenizer.py).

Importing an export back (``--from hf --to megaponder``) reads the megaponder config stored in
``config.json`` and the safetensors as they are, so tensors and config come back unchanged.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..config import Config, config_from_dict
from ..models.spec import family_spec
from ..train.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, checkpoint_tokenizer_path, write_model_files

REMOTE_MODEL_TYPE = "megaponder"


def _hf_remote_config(cfg: Config, model, special: dict) -> "object":
    """``special``: the tokenizer's ``eos_token_id`` / ``pad_token_id`` (empty without one)."""
    from .hf_remote.configuration_megaponder import MegaponderConfig

    m = cfg.model
    keep = model.keep_fractions() if hasattr(model, "keep_fractions") else None
    return MegaponderConfig(
        family=m.family, backbone=m.backbone, num_key_value_heads=m.kv_heads,
        vocab_size=m.padded_vocab(), tokenizer_vocab_size=m.vocab_size,
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        intermediate_size=m.ffn_size, max_position_embeddings=m.max_position_embeddings,
        rotary_pct=m.rotary_pct, rotary_emb_base=m.rotary_base,
        use_parallel_residual=m.parallel_residual, layer_norm_eps=m.layernorm_eps,
        tie_word_embeddings=m.tie_word_embeddings, ponder=cfg.to_dict()["ponder"],
        keep_fractions=[float(x) for x in keep] if keep is not None else None,
        megaponder_config=cfg.to_dict(), **special)


def export_checkpoint(path: str, output: str) -> str:
    """Write the Hugging Face folder of megaponder checkpoint (or run dir) ``path``; returns
    the class name written."""
    from ..safe_files import staged_output

    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    model = load_model(folder)
    with staged_output(output) as stage:  # save_pretrained opens by name: never via a planted link
        return _export(folder, cfg, model, stage)


def _export(folder: str, cfg, model, output: str) -> str:
    from transformers import GenerationConfig

    from .hf import HF_HEAD_NAMES, hf_config_from_model_config, hf_model_class, megaponder_to_hf
    from .tokenizer import export_tokenizer

    tok_path = checkpoint_tokenizer_path(folder)
    tok = export_tokenizer(tok_path, output, cfg.model.max_position_embeddings) if tok_path else None
    special = {"eos_token_id": tok.eod, "pad_token_id": tok.pad} if tok is not None else {}
    state = model.state_dict()
    if family_spec(cfg.model.family).plain_backbone:
        backbone = cfg.model.backbone
        hf = hf_model_class(backbone)(hf_config_from_model_config(cfg.model, **special))
        head_name = next(n for n in HF_HEAD_NAMES if n in hf.state_dict())
        hf.load_state_dict(megaponder_to_hf(state, cfg.model.num_layers, head_name, backbone),
                           strict=True)
    else:
        from .hf_remote.configuration_megaponder import MegaponderConfig
        from .hf_remote.modeling_megaponder import MegaponderForCausalLM

        # makes save_pretrained copy both source files and write config.json's auto_map
        MegaponderConfig.register_for_auto_class()
        MegaponderForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        hf = MegaponderForCausalLM(_hf_remote_config(cfg, model, special))
        hf.load_state_dict(state, strict=True)
    hf.generation_config = GenerationConfig(**special)
    hf.save_pretrained(output)
    return type(hf).__name__


def is_megaponder_export(hf_dir: str) -> bool:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") == REMOTE_MODEL_TYPE


def import_export(hf_dir: str, output: str, family: str = "vanilla", tp: Optional[int] = None,
                  pp: Optional[int] = None) -> Config:
    """megaponder checkpoint of a ``MegaponderForCausalLM`` folder written by
    :func:`export_checkpoint`: the same tensors and config (``tp``/``pp`` replace the
    recorded layout when given)."""
    from safetensors.torch import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    stored = hf_cfg.get("megaponder_config")
    if not stored:
        raise ValueError(f"{hf_dir}/config.json has model_type 'megaponder' but no "
                         f"megaponder_config; re-export it with tools/convert_checkpoint.py")
    cfg = config_from_dict(stored, check_paths=False)
    # --family names a family to build on a plain backbone checkpoint; an export has its own
    if family != cfg.model.family and not family_spec(family).plain_backbone:
        raise ValueError(f"{hf_dir} holds a '{cfg.model.family}' model; drop --family "
                         f"{family} (an export keeps its family)")
    if tp is not None:
        cfg.parallel.tp = tp
    if pp is not None:
        cfg.parallel.pp = pp
    weights = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{hf_dir} has no model.safetensors (sharded exports are not "
                                f"supported here)")
    state = load_file(weights)
    from ..models import build_model

    model = build_model(cfg)
    own = model.state_dict()
    if cfg.model.tie_word_embeddings and "embed_out.weight" not in state:
        state["embed_out.weight"] = state["embed_in.weight"]  # safetensors stores a tie once
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{weights} does not match a '{cfg.model.family}' model: missing "
                       f"{missing[:5]}, unexpected {unexpected[:5]}")
    tok = os.path.join(hf_dir, "tokenizer.json")
    meta = {"step": 0, "source": os.path.abspath(hf_dir), "family": cfg.model.family,
            "tp": cfg.parallel.tp, "pp": cfg.parallel.pp}
    write_model_files(output, cfg, {k: state[k].to(own[k].dtype) for k in own}, meta,
                      tok if os.path.exists(tok) else None)
    return cfg
