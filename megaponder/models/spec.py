"""One declaration per model family: what the rest of megaponder needs to know about it.

Each family module ends with ``register_family(FamilySpec(...))`` next to its model class
(models/base.py, ponder.py, latent.py, baselines.py); config validation, the registry
(``build_model``), the cached-decoder factory (megaponder/models/decoders.py), the FLOPs
formulas (models/flops.py), the depth analysis and the tests' family matrix read it instead
of keeping their own family lists. A trait a family does not declare (no decoder, no FLOPs
formula, no sequence parallelism) is an error naming the family and the capability
(:func:`require`), never a silent fallback. docs/architecture.md "A new family".

This module imports no torch, so config validation can consult the specs registered so far.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from .args import FAMILY_MODULES

#: modules that declare the built-in families (imported on the first lookup), from the light
#: table in args.py. Names are relative to this package (".ponder"), so they resolve in
#: megaponder.models and in the copy of these files a Hugging Face export loads
#: (transformers_modules.<folder>).
BUILTIN_MODULES = tuple(dict.fromkeys(FAMILY_MODULES.values()))


#: where the built-in decoders live (FamilySpec.decoder = DECODERS + "VerticalDecoder")
DECODERS = ".decoders:"
#: the static-shape (CUDA-graph-friendly) decoder of the vertical families
STATIC_DECODER = ".static_cache:StaticVerticalDecoder"


class MissingCapability(NotImplementedError):
    """A family was asked for something its FamilySpec does not declare."""


@dataclass(frozen=True)
class FamilySpec:
    """A family's traits. Callables receive the model (or flops.Dims) they concern."""

    name: str
    #: the nn.Module class; ``cls(model_cfg, ponder_cfg)`` builds it
    model_cls: type
    #: fixed: one stack pass per token, or a fixed number (vanilla, loop); vertical: the stack
    #: repeated over the whole sequence with a pondering embedding between passes; latent:
    #: interleaved thought positions in one sequence (positions beyond max_position_embeddings
    #: are fine: thoughts repeat their token's position id)
    kind: Literal["fixed", "vertical", "latent"]
    #: ``decoder(model, seed, prefill) -> decoder`` with ``feed(ids) -> logits`` equal to the
    #: training forward, or its "module:name" (resolved on use, so a family module need not
    #: import the decoders module, which imports the family modules); None: no cached decoding
    decoder: Optional[Callable[..., Any] | str] = None
    #: ``static_decoder(model, batch, max_len, seed, compile, compile_backend) -> decoder``
    #: with the same ``feed`` on a preallocated cache and a fixed-shape one-token step
    #: (megaponder/models/static_cache.py), or its "module:name"; None: dynamic decoding only
    static_decoder: Optional[Callable[..., Any] | str] = None
    #: ``train_flops(dims, seq_len, causal, jacobi_passes) -> float``: one training forward
    train_flops: Optional[Callable[..., float]] = None
    #: ``inference_flops(dims, seq_len, activity) -> float``: KV-cached decoding of a sequence
    inference_flops: Optional[Callable[..., float]] = None
    #: the shared stack runs ponder.steps + 1 times per token (models/init.py divides the output
    #: projections by sqrt(K+1) for these under ponder.depth_scaled_init)
    recurrent: bool = False
    #: parallel.sequence_parallel allowed (the family's stack calls see full-length,
    #: final-normed sequences with only token-wise work outside; parallel/parallelize.py)
    sequence_parallel: bool = False
    #: how depth varies per token: none (fixed), gate (AdaPonderLM's learned halting gate),
    #: schedule (non-learned per-token pruning draws), router (PonderLM-3's step router)
    halting: Literal["none", "gate", "schedule", "router"] = "none"
    #: analysis/depth.py: what its per-token "iterations" count means
    iteration_kind: str = "constant (fixed depth)"
    #: analysis/depth.py full_depth(): the ponder.tau that keeps every token at full depth
    #: (None: the family has no tau to change)
    full_depth_tau: Optional[float] = None
    #: the model is the backbone LM alone (no parameter of its own, one pass per token): it
    #: loads a backbone checkpoint as is, exports to transformers' own classes, gets the
    #: backbone's published init, and sequence parallelism covers its embedding and head too
    plain_backbone: bool = False
    #: the interleaved stages are trained by Jacobi iteration (``ponder.jacobi_passes``) and
    #: evaluated so (``ponder.eval_mode``, reported by evaluation; a cached-decoder prefill)
    jacobi: bool = False
    #: parameters the family adds to the backbone (prefixes of their names); the model's
    #: extra_parameter_names() lists exactly the parameters under them
    extra_parameters: tuple[str, ...] = ()
    #: PonderConfig fields the family reads (documentation and a consistency test)
    ponder_keys: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.kind not in ("fixed", "vertical", "latent"):
            raise ValueError(f"FamilySpec '{self.name}': kind must be fixed, vertical or latent, "
                             f"not '{self.kind}'")


_SPECS: dict[str, FamilySpec] = {}
_loaded = False


def register_family(spec: FamilySpec) -> FamilySpec:
    """Declare a family (at the bottom of its model module, or in a user's own module)."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family takes a FamilySpec, got {type(spec).__name__}")
    _SPECS[spec.name] = spec
    spec.model_cls.family = spec.name
    return spec


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module, __package__)


def registered_names() -> tuple[str, ...]:
    """Families registered so far, without importing anything (config validation)."""
    return tuple(_SPECS)


def family_names() -> tuple[str, ...]:
    """Every registered family, built-in ones first (the tests' family matrix)."""
    _load_builtin()
    return tuple(_SPECS)


def family_spec(name: str) -> FamilySpec:
    _load_builtin()
    if name not in _SPECS:
        match = difflib.get_close_matches(str(name), list(_SPECS), n=1, cutoff=0.5)
        hint = f" Did you mean '{match[0]}'?" if match else ""
        raise ValueError(f"unknown model family '{name}'; choose one of {list(_SPECS)}.{hint}")
    return _SPECS[name]


def require(name: str, capability: str) -> Any:
    """The spec's ``capability`` of family ``name``, or a one-line error naming both."""
    spec = family_spec(name)
    value = getattr(spec, capability)
    if value is None or value is False:
        raise MissingCapability(f"model family '{name}' does not support {capability} (its "
                                f"FamilySpec declares none); pick another family or add it to "
                                f"the family's register_family(FamilySpec(...)).")
    if isinstance(value, str):   # "module:name", ".module:name" relative to this package
        module, _, name = value.partition(":")
        value = getattr(importlib.import_module(module, __package__), name)
    return value
