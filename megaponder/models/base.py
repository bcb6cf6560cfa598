"""The vanilla GPT-NeoX causal LM and what every family shares: embedding in, head out,
the loss, and the output type.

Conventions every family follows:
  * ``model(input_ids, targets=None, position_ids=None, attention_mask=None, segment_ids=None)``
    with ``targets`` already aligned to the inputs (``targets[:, t]`` is the token after
    ``input_ids[:, t]``; -100 is ignored). The data pipeline yields ``seq_len + 1`` tokens and
    the trainer splits them, so no family shifts anything.
  * it returns a :class:`ModelOutput`: ``logits`` [B, T, padded_vocab]; with targets, ``loss``
    (the full training objective) and ``lm_loss`` (the language-model cross-entropy alone);
    ``stats`` holds detached scalars for logging (``mean_iters``, ``flops_ratio``, ...).
  * ``set_step(step)`` tells step-dependent objectives (the bottom-k warm-up) where training is.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelConfig
from .ponder_args import PonderConfig
from .kernels import choose_backend  # noqa: F401  (importing kernels registers the optional
#   attention backends and auto; the named form is what transformers' loader follows)
from .attention import AttentionSpec
from .chunked import IGNORE_INDEX, linear_cross_entropy
from .init import init_backbone_weights
from .spec import DECODERS, STATIC_DECODER, FamilySpec, family_spec, register_family
from .backbones import build_stack


@dataclass
class ModelOutput:
    #: None only for a training forward with targets and ``model.loss_chunk_size`` (never held)
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-ignored targets, computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, t = input_ids.shape
    return torch.arange(t, device=input_ids.device).expand(b, t)


def fixed_token_stats(input_ids: torch.Tensor, iterations: float) -> dict:
    """``return_token_stats=True`` (every family's forward accepts it) adds
    ``stats["token_iterations"]``, a detached float [B, T] tensor of the backbone iterations each
    token executes at inference (megaponder/analysis/depth.py). Fixed-depth families fill it
    with their constant depth."""
    return {"token_iterations": torch.full(tuple(input_ids.shape), float(iterations),
                                           device=input_ids.device)}


def with_fixed_token_stats(forward):
    """Decorates the forward of a fixed-depth family (every token runs the same number of
    iterations): ``return_token_stats=True`` adds :func:`fixed_token_stats` with the
    forward's own ``stats["mean_iters"]`` (1 when it reports none)."""
    @functools.wraps(forward)
    def wrapped(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None, return_token_stats: bool = False):
        out = forward(self, input_ids, targets, position_ids, attention_mask, segment_ids)
        if return_token_stats:
            out.stats.update(fixed_token_stats(input_ids, out.stats.get("mean_iters", 1.0)))
        return out
    return wrapped


class CausalLM(nn.Module):
    """Vanilla Pythia: embed_in -> NeoX stack -> embed_out. Families subclass it."""

    family = "vanilla"

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.ponder_cfg = ponder or PonderConfig()
        self.vocab_size = cfg.padded_vocab()
        self.embed_in = nn.Embedding(self.vocab_size, cfg.hidden_size)
        self.stack = build_stack(cfg)
        self.embed_out = nn.Linear(cfg.hidden_size, self.vocab_size, bias=False)
        init_backbone_weights(self, cfg, self.ponder_cfg, self.family)
        if cfg.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight
        self.training_step = 0

    # -- pieces the families compose ------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The stack input of a token's first pass (the one name every family and decoder
        uses): the plain embedding here; families that scale it override this."""
        return self.embed(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden)

    #: vocabulary-sized ops over a vocabulary split across ranks (megaponder/parallel sets a
    #: VocabParallelOps here); None: the single-device ones below
    vocab_ops = None

    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Every family computes its cross-entropy here, so tensor parallelism can route it
        to the vocab-parallel one (``vocab_ops``)."""
        if self.vocab_ops is not None:
            return self.vocab_ops.lm_loss(logits, targets)
        return lm_cross_entropy(logits, targets)

    def chunked_vocab(self) -> int:
        """Tokens per chunk for the memory-bounded vocabulary ops (megaponder/models/chunked.py),
        or 0 for the plain ones: chunking applies to training forwards (grad enabled) of the
        single-device head; tensor parallelism keeps its vocab-parallel ops."""
        chunk = self.cfg.loss_chunk_size
        if not chunk or not (self.training and torch.is_grad_enabled()):
            return 0
        plain = (type(self.embed_out) is nn.Linear and self.vocab_ops is None
                 and getattr(self.lm_loss, "__func__", None) is CausalLM.lm_loss)
        return chunk if plain else 0

    def head_and_loss(self, hidden: torch.Tensor, targets: torch.Tensor):
        """(logits, lm loss) of the final hidden states; (None, loss) when chunked."""
        chunk = self.chunked_vocab()
        if chunk:
            return None, linear_cross_entropy(hidden, self.embed_out.weight, targets, chunk)
        logits = self.head(hidden)
        return logits, self.lm_loss(logits, targets)

    @staticmethod
    def attention_spec(attention_mask=None, segment_ids=None) -> AttentionSpec:
        return AttentionSpec(key_padding_mask=attention_mask, segment_ids=segment_ids)

    def set_step(self, step: int) -> None:
        self.training_step = step

    def extra_parameter_names(self) -> list[str]:
        """Parameters a family adds on top of the NeoX backbone (gates, routers): the only
        ones trained in a gate-only phase and the ones initialised fresh from Pythia. Declared
        once, as the FamilySpec's ``extra_parameters`` name prefixes."""
        prefixes = family_spec(self.family).extra_parameters
        return [n for n, _ in self.named_parameters()
                if any(n == p or n.startswith(p + ".") for p in prefixes)]

    def parameter_lr_scales(self) -> dict[str, float]:
        """Parameter name -> learning rate as a multiple of optim.lr, for the parameters that
        train at another rate (PonderLM-3's ponder.router_lr_mult); the rest are absent."""
        return {}

    # -- vanilla forward ------------------------------------------------------------------
    @with_fixed_token_stats
    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None) -> ModelOutput:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        hidden, _ = self.stack(self.input_embeddings(input_ids), position_ids,
                               self.attention_spec(attention_mask, segment_ids))
        if targets is None:
            return ModelOutput(logits=self.head(hidden))
        logits, lm_loss = self.head_and_loss(hidden, targets)
        return ModelOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss,
                           stats={"mean_iters": 1.0, "flops_ratio": 1.0})


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    total = 0
    for name, p in model.named_parameters():
        if exclude_embeddings and ("embed_in" in name or "embed_out" in name):
            continue
        total += p.numel()
    return total


# -- family spec (megaponder/models/spec.py) ----------------------------------------------
def _register() -> None:
    from .flops import vanilla_inference_flops, vanilla_train_flops
    register_family(FamilySpec(
        name="vanilla", model_cls=CausalLM, kind="fixed", decoder=DECODERS + "VerticalDecoder",
        static_decoder=STATIC_DECODER,
        train_flops=vanilla_train_flops, inference_flops=vanilla_inference_flops,
        sequence_parallel=True, plain_backbone=True))


_register()
