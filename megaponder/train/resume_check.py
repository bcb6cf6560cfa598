"""Is a run dir's checkpoint a model of the configured kind? Checked before any weight is read.

Resuming with another ``model.family``, ``model.backbone`` or shape than the checkpoint was
saved with used to fail inside the state-dict load with dozens of ``Missing key(s)`` /
``Unexpected key(s)`` lines. The checkpoint's own ``config.yml`` records all of these, so the
comparison costs one small YAML read.
"""
from __future__ import annotations

import os
from typing import Optional

from .checkpoint import CheckpointError, read_checkpoint_config

#: the model settings that decide which tensors a checkpoint holds and their shapes
SHAPE_KEYS = ("family", "backbone", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "intermediate_size", "tie_word_embeddings")


def _model_signature(cfg) -> dict:
    sig = {f"model.{key}": getattr(cfg.model, key) for key in SHAPE_KEYS}
    sig["model.vocab_size (padded)"] = cfg.model.padded_vocab()
    return sig


def resume_mismatch(saved_cfg, cfg) -> Optional[str]:
    """'key: saved -> configured' for every shape setting that differs, or None."""
    saved, wanted = _model_signature(saved_cfg), _model_signature(cfg)
    diffs = [f"{key}={saved[key]} (config says {wanted[key]})"
             for key in saved if saved[key] != wanted[key]]
    return ", ".join(diffs) or None


def check_resume_compatible(folder: str, cfg) -> None:
    """Raise :class:`CheckpointError` (one line) when the checkpoint in ``folder`` holds
    another kind of model than ``cfg`` builds."""
    problem = resume_mismatch(read_checkpoint_config(folder), cfg)
    if problem is None:
        return
    run_dir = cfg.train.run_dir
    raise CheckpointError(
        f"cannot resume from {folder}: it holds another model: {problem}. Resume with the "
        f"run's settings ({os.path.join(run_dir, 'config.yml')}), or choose another "
        f"train.run_dir (train.overwrite=true starts this one over).")
