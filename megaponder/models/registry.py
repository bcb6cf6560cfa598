"""Family name -> model class. Families register themselves on import."""
from __future__ import annotations

import importlib

from ..config import FAMILIES, Config, ModelConfig, PonderConfig

_FAMILY_CLASSES: dict[str, type] = {}
# module that defines each family (imported lazily so a broken optional family never
# blocks the others)
_FAMILY_MODULES = {
    "vanilla": "megaponder.models.base",
    "ponderlm": "megaponder.models.ponder",
    "adaponderlm": "megaponder.models.ponder",
    "ponderlm2": "megaponder.models.latent",
    "ponderlm3": "megaponder.models.latent",
    "loop": "megaponder.models.baselines",
    "pause": "megaponder.models.baselines",
    "fixed_pruning": "megaponder.models.baselines",
    "random_halting": "megaponder.models.baselines",
}


def register_family(name: str, module: str | None = None):
    def wrap(cls):
        _FAMILY_CLASSES[name] = cls
        cls.family = name
        return cls
    return wrap


def family_class(name: str) -> type:
    if name == "vanilla":
        from .base import CausalLM
        return CausalLM
    if name not in _FAMILY_CLASSES:
        if name not in FAMILIES:
            raise ValueError(f"unknown model family '{name}'; choose one of {list(FAMILIES)}")
        module = _FAMILY_MODULES.get(name)
        if module is None:
            raise NotImplementedError(f"model family '{name}' is not implemented yet")
        importlib.import_module(module)
    return _FAMILY_CLASSES[name]


def build_model(config: Config | ModelConfig, ponder: PonderConfig | None = None):
    """A single-device model of ``config.model.family`` (weights freshly initialised)."""
    if isinstance(config, Config):
        model_cfg, ponder = config.model, config.ponder
    else:
        model_cfg = config
    return family_class(model_cfg.family)(model_cfg, ponder or PonderConfig())
