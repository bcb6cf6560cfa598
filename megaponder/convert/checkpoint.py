"""Checkpoint conversion between Hugging Face Pythia (``GPTNeoXForCausalLM``) and megaponder.

megaponder checkpoints always hold the full, unsharded state dict (``model.pt``); the
``--tp/--pp`` given at conversion are recorded as the layout the run will train with, and the
trainer shards at start-up. So one converted folder serves every parallel layout.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Optional

import torch

from ..config import Config, ModelConfig, validate
from ..train.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, write_model_files
from .hf import HF_HEAD_NAMES, hf_config_from_model_config, hf_to_megaponder, megaponder_to_hf, model_config_from_hf

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load_hf(hf_dir: str):
    from transformers import GPTNeoXForCausalLM

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"'{hf_dir}' is not a Hugging Face save_pretrained folder "
                                f"(no config.json)")
    return GPTNeoXForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)


def hf_to_megaponder_checkpoint(hf_dir: str, output: str, family: str = "vanilla", tp: int = 1,
                                pp: int = 1, vocab_size: Optional[int] = None) -> Config:
    """Write a megaponder checkpoint of ``family`` initialised from a Pythia checkpoint.

    ``vocab_size`` is the tokenizer's real size (Pythia: 50277 of 50304 rows); by default the
    HF config's (padded) size is used for both.
    """
    hf = _load_hf(hf_dir)
    model_cfg: ModelConfig = model_config_from_hf(hf.config)
    backbone = hf_to_megaponder(hf.state_dict(), model_cfg.num_layers)
    tokenizer = os.path.join(hf_dir, "tokenizer.json")
    return write_backbone_checkpoint(model_cfg, backbone, output, family, tp, pp, vocab_size,
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
    if family == "vanilla":
        model.load_state_dict(backbone)
    else:
        from ..models.ponder import init_family_from_backbone

        init_family_from_backbone(model, backbone)
    meta = {"step": 0, "source": os.path.abspath(source), "family": family, "tp": tp, "pp": pp}
    write_model_files(output, cfg, model.state_dict(), meta, tokenizer)
    return cfg


def megaponder_to_hf_checkpoint(path: str, output: str) -> None:
    """Save a megaponder checkpoint's backbone as a ``GPTNeoXForCausalLM`` folder.

    Hugging Face's GPTNeoX runs one pass; a pondering family's recurrence, gates and routers
    cannot be expressed there, so they are written beside it (``megaponder_extras.pt``) and
    a warning says that the HF model is the backbone only.
    """
    from transformers import GPTNeoXForCausalLM

    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    model = load_model(folder)
    hf = GPTNeoXForCausalLM(hf_config_from_model_config(cfg.model))
    head_name = next(n for n in HF_HEAD_NAMES if n in hf.state_dict())
    state = model.state_dict()
    hf.load_state_dict(megaponder_to_hf(state, cfg.model.num_layers, head_name), strict=True)
    hf.save_pretrained(output)
    extras = {k: v for k, v in state.items() if k in set(model.extra_parameter_names())}
    if cfg.model.family != "vanilla":
        warnings.warn(f"'{cfg.model.family}' exported as its GPT-NeoX backbone only: Hugging Face "
                      f"runs a single pass. Gates/routers are in megaponder_extras.pt.")
        torch.save(extras, os.path.join(output, "megaponder_extras.pt"))
        with open(os.path.join(output, "megaponder_family.json"), "w") as f:
            json.dump({"family": cfg.model.family, "ponder": cfg.to_dict()["ponder"]}, f, indent=2)
    tok = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copyfile(tok, os.path.join(output, "tokenizer.json"))
