"""Baselines for fair comparisons (docs/families.md "Baselines").

* ``loop``: the stack repeated K+1 times on the (pre-final-norm) hidden state — a weight-shared
  deeper model, the Loop Transformer of the papers' tables.
* ``pause``: ``ponder.pause_tokens`` learned pause embeddings after every token, in the
  PonderLM-2 interleaved layout (repeated position ids), one pass, read at the last pause;
  the pause embedding is scaled by sqrt(d) like the token embeddings (official code).
* ``fixed_pruning``: PonderLM with AdaPonderLM's halting machinery (monotonic mask, KV reuse,
  halted readout) but a non-learned mask: iteration i keeps a fraction r_i of each sequence's
  tokens, chosen at random (uniform: r falls linearly; geometric: r_i = q^i).
* ``random_halting``: the same, every active token halting with probability p per iteration.
Both pruning baselines calibrate their schedule to ``ponder.target_mean_iters`` (backbone
passes per token, the papers' iso-FLOPs scale: a trained AdaPonderLM's logged ``mean_iters``;
default 3.8) or, when set, ``ponder.target_flops_ratio`` (the full inference-FLOPs scale)
through megaponder/models/flops.py, so iso-FLOPs comparisons need one number.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .args import ModelConfig
from .ponder_args import PonderConfig
from .base import ModelOutput, default_position_ids, with_fixed_token_stats
from .latent import LatentLM
from .ponder import HALTING_PONDER_KEYS, VERTICAL_PONDER_KEYS, PonderLM, valid_token_mask
from .spec import DECODERS, STATIC_DECODER, FamilySpec, register_family


class LoopLM(PonderLM):
    """Weight-shared depth: x <- layers(x), K+1 times, then the final norm and head."""

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        super().__init__(cfg, ponder)
        # the PonderLM-2 code's loop baseline scales its embeddings by sqrt(2.5 d) (unit RMS
        # for the sqrt(2/(5d)) init), the same scale as its latent thoughts' tokens
        p = self.ponder_cfg
        self.embed_scale = math.sqrt(p.thought_embed_scale * cfg.hidden_size) if p.scale_embeds else 1.0

    def input_embeddings(self, input_ids):
        return self.embed(input_ids) * self.embed_scale

    @with_fixed_token_stats
    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None) -> ModelOutput:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        spec = self.attention_spec(attention_mask, segment_ids)
        x = self.input_embeddings(input_ids)
        for _ in range(self.num_passes):
            x, _ = self.stack(x, position_ids, spec, apply_final_norm=False)
        logits = self.head(self.stack.final_norm(x))
        from .flops import fixed_flops_ratio
        stats = {"mean_iters": float(self.num_passes),
                 "flops_ratio": fixed_flops_ratio(self, input_ids.shape[1])}
        if targets is None:
            return ModelOutput(logits=logits, stats=stats)
        lm_loss = self.lm_loss(logits, targets)
        return ModelOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss, stats=stats)


class _PlannedHalting(PonderLM):
    """Vertical halting with a mask decided up front from per-token random priorities."""

    adaptive = True

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        super().__init__(cfg, ponder)
        self._keep: Optional[list[float]] = None

    #: the baselines' target when neither ponder.target_mean_iters nor target_flops_ratio is
    #: set: AdaPonderLM's published 3.8 backbone passes per token
    DEFAULT_MEAN_ITERS = 3.8

    def keep_fractions(self) -> list[float]:
        """Expected kept fraction per iteration, r_0 = 1."""
        raise NotImplementedError

    def calibrated_schedule(self, kind: str) -> list[float]:
        """Schedule of ``kind`` at the configured target: ponder.target_flops_ratio on the
        full inference-FLOPs scale when set, else ponder.target_mean_iters (default 3.8)
        backbone passes per token, the scale the papers compare on."""
        from .flops import schedule_for_mean_iters, schedule_for_ratio
        p = self.ponder_cfg
        if p.target_flops_ratio is not None:
            return schedule_for_ratio(self, p.target_flops_ratio, kind)
        target = p.target_mean_iters if p.target_mean_iters is not None else self.DEFAULT_MEAN_ITERS
        return schedule_for_mean_iters(self, target, kind)

    def priorities(self, batch: int, seq: int, device) -> torch.Tensor:
        """Per-token uniforms u [B, T]: seeded per training step and micro-batch in training;
        per evaluation batch (set_eval_stream) and token position outside it, the numbers
        the cached decoder draws for the same tokens."""
        if self.training:
            return torch.rand(batch, seq, generator=self.sample_generator(salt=2)).to(device)
        rows = torch.arange(batch).view(-1, 1).expand(batch, seq)
        pos = torch.arange(seq).view(1, -1).expand(batch, seq)
        return self.eval_uniforms(rows, pos, self._eval_stream, salt=2).to(device)

    def threshold_plan(self, u: torch.Tensor) -> torch.Tensor:
        """Causal rule (also used by the decoder): active at i iff u < r_i."""
        r = torch.tensor(self.keep_fractions(), device=u.device, dtype=u.dtype)
        return u.unsqueeze(0) < r.view(-1, *([1] * u.dim()))

    def halting_plan(self, batch, seq, device, valid):
        return self.threshold_plan(self.priorities(batch, seq, device))


class FixedPruningLM(_PlannedHalting):
    """Exactly round(r_i * n) randomly chosen tokens of each sequence stay active at iteration
    i (the decoder, which cannot see the future, uses the expected-rate rule u < r_i)."""

    def keep_fractions(self) -> list[float]:
        if self._keep is None:
            self._keep = self.calibrated_schedule(self.ponder_cfg.prune_schedule)
        return self._keep

    def halting_plan(self, batch, seq, device, valid):
        u = self.priorities(batch, seq, device)
        u = torch.where(valid, u, torch.full_like(u, 2.0))  # padding ranks last
        rank = u.argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 = kept longest
        n = valid.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
        r = torch.tensor(self.keep_fractions(), device=device, dtype=torch.float32)
        keep_n = torch.round(r.view(-1, 1, 1) * n.unsqueeze(0))  # [P, B, 1]
        plan = rank.unsqueeze(0) < keep_n
        plan[0] = True
        return plan


class RandomHaltingLM(_PlannedHalting):
    """Each active token halts with probability p after every iteration (expected active
    fraction (1-p)^i); p = ponder.halting_rate or calibrated to the target (calibrated_schedule)."""

    def keep_fractions(self) -> list[float]:
        if self._keep is None:
            p = self.ponder_cfg
            if p.halting_rate is not None:
                self._keep = [(1.0 - p.halting_rate) ** i for i in range(self.num_passes)]
            else:
                self._keep = self.calibrated_schedule("geometric")
        return self._keep


class PauseLM(LatentLM):
    """Pause tokens in the PonderLM-2 layout: one pass, logits at the last pause position."""

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        ponder = ponder or PonderConfig()
        super().__init__(cfg, ponder, stages=ponder.pause_tokens + 1)
        # the PonderLM-2 code's pause baseline scales every input by sqrt(d), the pause
        # token's embedding row included (it is one more row of the embedding table)
        self.embed_scale = math.sqrt(cfg.hidden_size) if self.ponder_cfg.scale_embeds else 1.0
        self.pause_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * (2.0 / (5.0 * cfg.hidden_size)) ** 0.5)

    def pause_input(self, dtype) -> torch.Tensor:
        """The input [d] of every pause position: the learned pause embedding at the token
        embeddings' scale (sqrt(d) with scale_embeds), as the official code embeds a pause
        token id and scales all inputs alike."""
        return self.pause_embedding.to(dtype) * self.embed_scale

    def pause_stage_inputs(self, token_inputs: torch.Tensor) -> list[torch.Tensor]:
        """The inputs [B, T, d] of the pause stages 1..n of every token, given its stage-0
        input (the scaled token embedding): the scaled pause embedding at every one (a
        diagnostic variant may put the token there too: benchmarks/bench_pause_diagnosis.py)."""
        return [self.pause_input(token_inputs.dtype).expand_as(token_inputs)] * (self.num_stages - 1)

    def stage_input(self, previous_hidden: torch.Tensor) -> torch.Tensor:
        """Every pause position's input is the scaled pause embedding (as in forward)."""
        return self.pause_input(previous_hidden.dtype).detach().expand_as(previous_hidden)

    @with_fixed_token_stats
    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None) -> ModelOutput:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        e0 = self.input_embeddings(input_ids)
        hidden, _ = self.run_stages([e0] + self.pause_stage_inputs(e0), position_ids,
                                    attention_mask, segment_ids)
        logits = self.head(hidden[:, :, -1])
        from .flops import fixed_flops_ratio
        stats = {"mean_iters": float(self.num_stages),
                 "flops_ratio": fixed_flops_ratio(self, input_ids.shape[1])}
        if targets is None:
            return ModelOutput(logits=logits, stats=stats)
        lm_loss = self.lm_loss(logits, targets)
        return ModelOutput(logits=logits, loss=lm_loss, lm_loss=lm_loss, stats=stats)


# -- family specs (megaponder/models/spec.py) ---------------------------------------------
def _register() -> None:
    from .flops import (loop_inference_flops, loop_train_flops, pause_inference_flops,
                        pause_train_flops, vertical_inference_flops, vertical_train_flops)
    register_family(FamilySpec(
        name="loop", model_cls=LoopLM, kind="fixed", decoder=DECODERS + "LoopDecoder", recurrent=True,
        train_flops=loop_train_flops, inference_flops=loop_inference_flops,
        ponder_keys=("steps", "scale_embeds", "thought_embed_scale", "depth_scaled_init")))
    planned = dict(kind="vertical", decoder=DECODERS + "VerticalDecoder", recurrent=True,
                   static_decoder=STATIC_DECODER,
                   train_flops=vertical_train_flops,
                   inference_flops=vertical_inference_flops, sequence_parallel=True,
                   halting="schedule", full_depth_tau=None,
                   iteration_kind="iterations until halted (1 + halting iteration)")
    keys = VERTICAL_PONDER_KEYS + HALTING_PONDER_KEYS + ("target_mean_iters", "target_flops_ratio")
    register_family(FamilySpec(name="fixed_pruning", model_cls=FixedPruningLM,
                               ponder_keys=keys + ("prune_schedule",), **planned))
    register_family(FamilySpec(name="random_halting", model_cls=RandomHaltingLM,
                               ponder_keys=keys + ("halting_rate",), **planned))
    register_family(FamilySpec(
        name="pause", model_cls=PauseLM, kind="latent", decoder=DECODERS + "LatentDecoder",
        train_flops=pause_train_flops, inference_flops=pause_inference_flops,
        extra_parameters=("pause_embedding",),
        ponder_keys=("pause_tokens", "depth_scaled_init")))


_register()
