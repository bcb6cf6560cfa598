"""Horizontal recurrence: PonderLM-2 and PonderLM-3 (docs/papers.md §3, §2; docs/families.md).

K latent thoughts follow each token in one interleaved sequence of stride S = K+1:
``[x1, z1^1..z1^K, x2, z2^1..z2^K, ...]``; every stage of token t gets token t's position id;
thought k+1 of a token is the final-norm hidden state at its stage k. Training solves this
causal chain in parallel: K build-up passes (one stage added per pass, as the official code),
J Jacobi passes over the full sequence (J drawn each step from ``ponder.jacobi_passes``), and a
final pass; logits are read at the last stage. The fixed point of the Jacobi iteration is the
sequential token-by-token chain that megaponder/models/decoders.py decodes with a KV cache.

PonderLM-3 adds a router on each token's stage-0 hidden state: s_t = softmax over 0..K steps,
survival w_{t,k} = P(steps >= k); log w_{t,k} is added to the attention score of every query
at the key (t, k); the prediction is read from the mixture sum_k s_{t,k} h_t^{(k)}; a compute
penalty charges the expected number of extra steps. At inference steps with w < tau are neither
computed nor cached (hard pruning).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .args import ModelConfig
from .ponder_args import PonderConfig
from .attention import AttentionSpec
from .base import CausalLM, ModelOutput, default_position_ids
from .ponder import GateMLP, PonderMixin, masked_mean, valid_token_mask
from .spec import DECODERS, FamilySpec, register_family


def host_randint(n: int, generator: torch.Generator) -> int:
    """One draw in [0, n) from a CPU generator, as a Python int. The tensor lives on the host
    from the start, so reading it makes no device wait (tests/sync_count.py leaves this
    function out of its count by name)."""
    return int(torch.randint(n, (1,), generator=generator))


def interleave(stages: list[torch.Tensor]) -> torch.Tensor:
    """n tensors [B, T, d] -> [B, T*n, d] with stride n (token t's stages are adjacent)."""
    return torch.stack(stages, dim=2).flatten(1, 2)


def repeat_stages(x: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """[B, T] per-token values (positions, masks, segments) -> [B, T*n]."""
    return None if x is None else x.repeat_interleave(n, dim=1)


def log_survival(router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [.., K+1] -> (s = softmax, log w) with w_k = sum_{j>=k} s_j, log w_0 = 0."""
    log_s = torch.log_softmax(router_logits.float(), dim=-1)
    log_w = torch.logcumsumexp(log_s.flip(-1), dim=-1).flip(-1)
    log_w = torch.cat([torch.zeros_like(log_w[..., :1]), log_w[..., 1:]], dim=-1)
    return log_s.exp(), log_w


class LatentLM(PonderMixin, CausalLM):
    """Shared machinery of the interleaved families (PonderLM-2, PonderLM-3, pause)."""

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None, stages: Optional[int] = None):
        super().__init__(cfg, ponder)
        p = self.ponder_cfg
        self.num_stages = stages if stages is not None else p.steps + 1
        self._calls_this_step = 0
        self.embed_scale = math.sqrt(p.thought_embed_scale * cfg.hidden_size) if p.scale_embeds else 1.0

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids) * self.embed_scale

    def stage_input(self, previous_hidden: torch.Tensor) -> torch.Tensor:
        """A token's next thought position's input: its previous stage's last hidden state."""
        return previous_hidden

    def run_stages(self, stages, position_ids, attention_mask=None, segment_ids=None, key_bias=None):
        """One backbone pass over the interleaved stages -> hidden [B, T, n, d] and K/V."""
        n = len(stages)
        b, t, d = stages[0].shape
        spec = AttentionSpec(key_padding_mask=repeat_stages(attention_mask, n),
                             segment_ids=repeat_stages(segment_ids, n), key_bias=key_bias)
        hidden, kvs = self.stack(interleave(stages), repeat_stages(position_ids, n), spec)
        return hidden.view(b, t, n, d), kvs

    def jacobi_count(self, override: Optional[int] = None) -> Optional[int]:
        """Jacobi passes of this forward; None: iterate to eval_jacobi_tol (eval_mode exact)."""
        p = self.ponder_cfg
        if override is not None:
            return int(override)
        if not self.training:
            return p.eval_jacobi_passes if p.eval_mode == "official" else None
        if self._step_jacobi is None:   # set_step was never called
            self._step_jacobi = self.draw_jacobi_count()
        return self._step_jacobi

    #: the Jacobi count of the step set_step set (the forward never reads the step number:
    #: a whole-model torch.compile would guard on it and recompile every step)
    _step_jacobi = None

    def draw_jacobi_count(self) -> int:
        """The step's Jacobi count: one draw for the whole optimizer step (every micro-batch
        and every data-parallel rank alike)."""
        p = self.ponder_cfg
        return int(p.jacobi_passes[host_randint(len(p.jacobi_passes), self.training_generator(salt=1))])

    def set_step(self, step: int) -> None:
        """Also draws the step's Jacobi count here, outside the forward: under a whole-model
        torch.compile the count is then a plain int (a guard, no graph break for the draw)."""
        super().set_step(step)
        self._step_jacobi = self.draw_jacobi_count()


class PonderLM2(LatentLM):
    """Latent thoughts with Jacobi-parallel training."""

    # hooks PonderLM-3 fills in
    def pass_bias(self, n: int, state) -> Optional[torch.Tensor]:
        return None

    def after_pass(self, hidden: torch.Tensor, state):
        return state

    def latent_forward(self, input_ids, position_ids, attention_mask, segment_ids, jacobi_passes=None):
        """Build-up, Jacobi and final passes -> (hidden of the final pass [B, T, S, d], state,
        J, K/V of the final pass)."""
        p, K = self.ponder_cfg, self.num_stages - 1
        e0 = self.input_embeddings(input_ids)
        state, thoughts = None, []
        if p.buildup_passes:
            for k in range(K):
                hidden, _ = self.run_stages([e0] + thoughts, position_ids, attention_mask, segment_ids,
                                            self.pass_bias(k + 1, state))
                state = self.after_pass(hidden, state)
                thoughts = [hidden[:, :, j] for j in range(k + 1)]
        else:
            thoughts = [torch.zeros_like(e0) for _ in range(K)]
        J = self.jacobi_count(jacobi_passes)
        # exact mode: Jacobi on the causal chain of T*(K+1) positions fixes at least one more
        # position per pass, so T*(K+1) passes reach the sequential solution; the tolerance
        # stops long before (the residual contracts geometrically)
        limit, tol = (J, None) if J is not None else (e0.shape[1] * (K + 1), self.ponder_cfg.eval_jacobi_tol)
        done, residual = 0, 0.0
        while done < limit:
            hidden, _ = self.run_stages([e0] + thoughts, position_ids, attention_mask, segment_ids,
                                        self.pass_bias(K + 1, state))
            state = self.after_pass(hidden, state)
            new = [hidden[:, :, j] for j in range(K)]
            done += 1
            if tol is not None:
                residual = self._agreed(max(float((a - b).detach().abs().max()) for a, b in zip(new, thoughts))
                                        if K else 0.0)
            thoughts = new
            if tol is not None and residual <= tol:
                break
        J = done
        self.last_jacobi_residual = residual
        hidden, kvs = self.run_stages([e0] + thoughts, position_ids, attention_mask, segment_ids,
                                      self.pass_bias(K + 1, state))
        state = self.after_pass(hidden, state)
        return hidden, state, J, kvs

    def _agreed(self, residual: float) -> float:
        """The stopping residual every rank agrees on. Tensor/pipeline ranks of a replica
        compute identical thoughts; data-parallel ranks hold different batches, and under
        ZeRO-3 (parameters carry ``ds_id``) every module call is a collective, so there they
        must run the same number of passes: the maximum over all ranks."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return residual
        if not any(hasattr(p, "ds_id") for p in self.parameters()):
            return residual
        # where NCCL takes its tensors (megaponder.collectives.collective_device's rule: the
        # model core imports nothing of megaponder outside models/)
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        t = torch.tensor([residual], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None, jacobi_passes: Optional[int] = None,
                return_token_stats: bool = False) -> ModelOutput:
        """``return_token_stats=True`` adds detached float [B, T] tensors to ``stats``:
        ``token_iterations`` (backbone steps the token executes at inference, 1 + K-hat_t:
        K+1 for PonderLM-2, the steps kept by the router's tau cut for PonderLM-3) and, for
        PonderLM-3, ``token_expected_steps`` (1 + sum_{k>=1} w_{t,k}, the router's soft
        expectation). Used by megaponder/analysis/depth.py."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        hidden, state, J, _ = self.latent_forward(input_ids, position_ids, attention_mask, segment_ids,
                                                  jacobi_passes)
        valid = valid_token_mask(input_ids, attention_mask)
        logits, stats, extra_loss = self.readout(hidden, state, valid)
        stats["jacobi_passes"] = float(J)
        if not self.training:
            stats["jacobi_residual"] = float(self.last_jacobi_residual)
        if return_token_stats:
            stats.update(self.token_stats(state, input_ids))
        if targets is None:
            return ModelOutput(logits=logits, stats=stats)
        lm_loss = self.lm_loss(logits, targets)
        loss = lm_loss if extra_loss is None else lm_loss + extra_loss
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, stats=stats)

    def token_stats(self, state, input_ids) -> dict:
        """Per-token depth for ``return_token_stats`` (fixed: every token runs K+1 steps)."""
        from .base import fixed_token_stats
        return fixed_token_stats(input_ids, self.num_stages)

    def readout(self, hidden, state, valid):
        from .flops import fixed_flops_ratio
        stats = {"mean_iters": float(self.num_stages),
                 "flops_ratio": fixed_flops_ratio(self, hidden.shape[1])}
        return self.head(hidden[:, :, -1]), stats, None


class PonderLM3(PonderLM2):
    """PonderLM-2 plus a router over 0..K steps, log-survival attention bias, mixture readout
    and a compute penalty; hard pruning at inference (models/decoders.py)."""

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        super().__init__(cfg, ponder)
        p, d = self.ponder_cfg, cfg.hidden_size
        self.router = GateMLP(d, p.router_hidden_mult * d, p.steps + 1, p.gate_activation,
                              p.router_bias_init, math.sqrt(2.0 / (5.0 * d)))
        # training step 0 (base.CausalLM's training_step) until set_step says otherwise
        self.router_warming_up = p.router_warmup_steps > 0

    def set_step(self, step: int) -> None:
        """Also decides here whether the router is still in its warm-up, as a bool: the forward
        never reads the step number. A whole-model torch.compile guards on every int attribute
        the forward reads (nn.Module ints are static), so reading ``training_step`` there made
        it recompile on every training step; the bool changes once, at the end of the warm-up
        (never with the default router_warmup_steps = 0)."""
        super().set_step(step)
        self.router_warming_up = step < self.ponder_cfg.router_warmup_steps

    def route(self, h0: torch.Tensor):
        """Stage-0 hidden [.., d] -> (s [.., K+1], log w [.., K+1], keep [.., K+1] bool).
        Router logits are divided by ``router_temperature``; during the first
        ``router_warmup_steps`` training steps they are zeroed (uniform s, no router gradient),
        so every stage's readout is trained before the router may choose (benchmarks/
        bench_router.py ablations; neither knob is in the paper)."""
        p = self.ponder_cfg
        logits = self.router(h0) / p.router_temperature
        if self.training and self.router_warming_up:
            logits = logits * 0.0
        s, log_w = log_survival(logits)
        keep = log_w >= math.log(self.ponder_cfg.tau)
        keep[..., 0] = True
        return s, log_w, keep

    @property
    def hard_prune(self) -> bool:
        """Mask steps with w < tau exactly (the decoder's computation): in training with
        ponder.train_hard_prune, outside training with ponder.eval_hard_prune."""
        p = self.ponder_cfg
        return p.train_hard_prune if self.training else p.eval_hard_prune

    def key_bias_values(self, log_w: torch.Tensor, keep: torch.Tensor, dtype) -> torch.Tensor:
        """Per latent key additive bias: log w (soft) or -inf-like below tau (hard)."""
        bias = log_w.to(dtype)
        if self.hard_prune:
            bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
        return bias

    def pass_bias(self, n: int, state) -> Optional[torch.Tensor]:
        if state is None:
            return None
        _, log_w, keep = state
        dtype = self.embed_in.weight.dtype
        bias = self.key_bias_values(log_w[:, :, :n], keep[:, :, :n], dtype).flatten(1)  # [B, T*n]
        b, tk = bias.shape
        if self.ponder_cfg.bias_own_steps:
            return bias.view(b, 1, 1, tk)
        tok = torch.arange(tk, device=bias.device) // n
        same = tok.view(tk, 1) == tok.view(1, tk)  # [Tq, Tk] query and key of the same token
        return torch.where(same, torch.zeros((), dtype=dtype, device=bias.device),
                           bias.view(b, 1, 1, tk))

    def after_pass(self, hidden, state):
        return self.route(hidden[:, :, 0])

    def token_stats(self, state, input_ids) -> dict:
        _, log_w, keep = state
        return {"token_iterations": keep.float().sum(-1).detach(),
                "token_expected_steps": (1.0 + log_w[..., 1:].exp().sum(-1)).detach()}

    def mixture_weights(self, s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        p = self.ponder_cfg
        if self.hard_prune:
            s = s * keep
            if p.renormalize_pruned:
                s = s / s.sum(-1, keepdim=True)
        return s

    def geometric_prior_kl(self, s: torch.Tensor) -> torch.Tensor:
        """Per-token KL(s_t || prior) with PonderNet's truncated geometric prior over 0..K:
        prior_k proportional to lambda (1 - lambda)^k, lambda = ponder.penalty_prior_halt
        (compute_penalty_form kl_geometric). Zero only when s_t equals the prior, so it
        pulls a saturated router back toward a spread of steps."""
        lam = self.ponder_cfg.penalty_prior_halt
        k = torch.arange(s.shape[-1], device=s.device, dtype=torch.float32)
        log_prior = torch.log_softmax(k * math.log1p(-lam), dim=0)   # lambda cancels out
        s = s.float()
        return (s * (torch.log(s.clamp_min(1e-30)) - log_prior)).sum(-1)

    def parameter_lr_scales(self) -> dict[str, float]:
        mult = self.ponder_cfg.router_lr_mult
        return {} if mult == 1.0 else {n: mult for n in self.extra_parameter_names()}

    def readout(self, hidden, state, valid):
        from .flops import flops_ratio_tensor
        s, log_w, keep = state
        mix = self.mixture_weights(s, keep).to(hidden.dtype)
        h = torch.einsum("btk,btkd->btd", mix, hidden)
        logits = self.head(h)
        expected = log_w[..., 1:].exp().sum(-1)  # E[extra steps] = sum_{k>=1} w_k
        penalty = masked_mean(expected, valid)
        steps = keep.float().sum(-1)  # executed steps incl. step 0 under hard pruning
        v = valid.float()
        stats = {"mean_iters": masked_mean(steps, valid).detach(),
                 "expected_steps": penalty.detach() + 1.0}
        for k in range(1, self.num_stages):
            stats[f"active_frac/{k}"] = masked_mean(keep[..., k].float(), valid).detach()
        per_pos = (steps * v).sum(0) / v.sum(0).clamp_min(1.0)
        # a device tensor: read with the step's other statistics, on logging steps
        stats["flops_ratio"] = flops_ratio_tensor(self, per_pos.detach())
        if self.ponder_cfg.compute_penalty_form == "kl_geometric":
            penalty_term = masked_mean(self.geometric_prior_kl(s), valid)
        else:
            penalty_term = penalty
        extra = self.ponder_cfg.compute_penalty * penalty_term if self.ponder_cfg.compute_penalty else None
        if extra is not None:
            stats["compute_penalty"] = extra.detach()
        return logits, stats, extra


# -- family specs (megaponder/models/spec.py) ---------------------------------------------
#: PonderConfig keys of the Jacobi-trained latent families
LATENT_PONDER_KEYS = ("steps", "scale_embeds", "depth_scaled_init", "jacobi_passes",
                      "eval_jacobi_passes", "eval_mode", "eval_jacobi_tol", "buildup_passes",
                      "thought_embed_scale")


def _register() -> None:
    from .flops import latent_inference_flops, latent_train_flops
    latent = dict(kind="latent", decoder=DECODERS + "LatentDecoder", recurrent=True,
                  train_flops=latent_train_flops,
                  inference_flops=latent_inference_flops)
    register_family(FamilySpec(name="ponderlm2", model_cls=PonderLM2, ponder_keys=LATENT_PONDER_KEYS,
                               jacobi=True, **latent))
    register_family(FamilySpec(
        name="ponderlm3", model_cls=PonderLM3, halting="router", extra_parameters=("router",),
        iteration_kind="executed steps 1 + K-hat (router w >= tau)",
        # log tau must exist: the smallest positive float keeps every step (log w finite)
        full_depth_tau=5e-324,
        ponder_keys=LATENT_PONDER_KEYS + (
            "tau", "router_hidden_mult", "router_bias_init", "router_temperature",
            "router_warmup_steps", "router_lr_mult", "compute_penalty", "compute_penalty_form",
            "penalty_prior_halt", "bias_own_steps", "train_hard_prune", "eval_hard_prune", "renormalize_pruned"),
        jacobi=True, **latent))


_register()
