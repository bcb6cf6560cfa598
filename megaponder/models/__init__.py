"""The model core: families, backbones, attention, decoders, FLOPs and the model's config
sections. It imports only torch, the standard library and its own modules (flat relative
imports), so the Hugging Face export copies its files verbatim (docs/architecture.md).

The names below load on first use: ``import megaponder.config`` reads the config sections
here (models/args.py, ponder_args.py) without importing torch.
"""
import importlib

_LAZY = {"AttentionSpec": "attention", "CausalLM": "base", "ModelOutput": "base",
         "lm_cross_entropy": "base", "build_model": "registry", "family_class": "registry",
         "register_family": "registry"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
