"""Checkpoint conversion between Hugging Face Pythia (``GPTNeoXForCausalLM``) or Llama
(``LlamaForCausalLM``) and megaponder.

megaponder checkpoints always hold the full, unsharded state dict (``model.pt``); the
``--tp/--pp`` given at conversion are recorded as the layout the run will train with, and the
trainer shards at start-up. So one converted folder serves every parallel layout.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import Config, ModelConfig, validate
from ..models.spec import family_spec
from ..train.checkpoint import write_model_files
from .hf import HF_MODEL_TYPES, hf_model_class, hf_to_megaponder, model_config_from_hf

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load_hf(hf_dir: str):
    """The GPTNeoXForCausalLM or LlamaForCausalLM of ``hf_dir``, chosen by its config."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"'{hf_dir}' is not a Hugging Face save_pretrained folder "
                                f"(no config.json)")
    model_type = AutoConfig.from_pretrained(hf_dir).model_type
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{hf_dir}/config.json has model_type '{model_type}'; megaponder "
                         f"converts {sorted(HF_MODEL_TYPES)} (GPTNeoXForCausalLM, LlamaForCausalLM)")
    return hf_model_class(HF_MODEL_TYPES[model_type]).from_pretrained(hf_dir, dtype=torch.float32)


def hf_to_megaponder_checkpoint(hf_dir: str, output: str, family: str = "vanilla",
                                tp: Optional[int] = None, pp: Optional[int] = None,
                                vocab_size: Optional[int] = None) -> Config:
    """Write a megaponder checkpoint of ``family`` initialised from a Pythia or Llama checkpoint.

    ``tp``/``pp``: the layout the run will use (None: 1, or for a re-imported megaponder export
    the layout it was exported from — so ``tp=1`` can reset a tp=2 export).
    ``vocab_size`` is the tokenizer's real size (Pythia: 50277 of 50304 rows); by default the
    HF config's (padded) size is used for both.
    """
    from .hf_export import import_export, is_megaponder_export

    if is_megaponder_export(hf_dir):  # our own remote-code export: same tensors and config
        return import_export(hf_dir, output, family, tp, pp)
    hf = _load_hf(hf_dir)
    model_cfg: ModelConfig = model_config_from_hf(hf.config)
    backbone = hf_to_megaponder(hf.state_dict(), model_cfg.num_layers, model_cfg.backbone)
    tokenizer = os.path.join(hf_dir, "tokenizer.json")
    return write_backbone_checkpoint(model_cfg, backbone, output, family, tp or 1, pp or 1, vocab_size,
                                     source=hf_dir,
                                     tokenizer=tokenizer if os.path.exists(tokenizer) else None)


def write_backbone_checkpoint(model_cfg: ModelConfig, backbone: dict, output: str, family: str,
                              tp: int, pp: int, vocab_size: Optional[int], source: str,
                              tokenizer: Optional[str] = None) -> Config:
    """A megaponder checkpoint of ``family`` from backbone tensors under megaponder names
    (any importer: Hugging Face, GPT-NeoX native); ``tp``/``pp`` are the layout recorded for
    the run that trains from it."""
    if vocab_size is not None:
        model_cfg.vocab_size = vocab_size
    model_cfg.family = family
    cfg = Config(model=model_cfg)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.data.tokenizer_type = "HFTokenizer"
    validate(cfg, check_paths=False)
    from ..models import build_model

    model = build_model(cfg)
    if family_spec(family).plain_backbone:
        model.load_state_dict(backbone)
    else:
        from ..models.ponder import init_family_from_backbone

        init_family_from_backbone(model, backbone)
    meta = {"step": 0, "source": os.path.abspath(source), "family": family, "tp": tp, "pp": pp}
    write_model_files(output, cfg, model.state_dict(), meta, tokenizer)
    return cfg


def megaponder_to_hf_checkpoint(path: str, output: str) -> str:
    """Save a megaponder checkpoint as a Hugging Face folder: vanilla as
    ``GPTNeoXForCausalLM`` (llama backbone: ``LlamaForCausalLM``), every other family as the self-contained ``trust_remote_code``
    ``MegaponderForCausalLM`` (megaponder/convert/hf_export.py). Returns the class written."""
    from .hf_export import export_checkpoint

    return export_checkpoint(path, output)
