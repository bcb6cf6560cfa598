"""Family name -> model class, from the family specs (megaponder/models/spec.py)."""
from __future__ import annotations

from .args import ModelConfig
from .ponder_args import PonderConfig
from .spec import FamilySpec, family_spec, register_family

__all__ = ["FamilySpec", "build_model", "family_class", "register_family"]


def family_class(name: str) -> type:
    return family_spec(name).model_cls


def build_model(config, ponder: PonderConfig | None = None):
    """A single-device model of ``config.model.family`` (weights freshly initialised);
    ``config`` is a whole megaponder Config or its ModelConfig (then ``ponder`` or defaults)."""
    if isinstance(config, ModelConfig):
        model_cfg = config
    else:
        model_cfg, ponder = config.model, config.ponder
    return family_class(model_cfg.family)(model_cfg, ponder or PonderConfig())
