from . import kernels  # noqa: F401  (registers the optional attention backends and auto)
from .attention import AttentionSpec, attention
from .base import CausalLM, ModelOutput, lm_cross_entropy
from .registry import build_model, family_class, register_family

__all__ = ["AttentionSpec", "attention", "CausalLM", "ModelOutput", "lm_cross_entropy",
           "build_model", "family_class", "register_family"]
