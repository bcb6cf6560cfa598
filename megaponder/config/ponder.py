"""``ponder:`` — settings of the pondering families and their baselines.

Where the papers leave a choice open (shared/docs/papers.md marks them), the field's help says
so and the default is the most likely reading.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import param


@dataclass
class PonderConfig:
    # --- vertical recurrence: PonderLM / AdaPonderLM / loop and the halting baselines ---
    steps: int = param(3, "Pondering steps K: the stack runs K+1 times (PonderLM default 3, "
                       "i.e. 4 passes). For latent families: thoughts per token.")
    scale_embeds: bool = param(True, "Multiply input embeddings by sqrt(d) (PonderLM official code).")
    top_k: int = param(0, "Pondering embedding from the top-k probabilities only (0: full softmax).")
    # --- AdaPonderLM gates and halting ---
    gate_hidden_mult: int = param(4, "Gate MLP hidden width as a multiple of d (paper: '4h'; "
                                  "unconfirmed).")
    gate_activation: Literal["gelu", "relu", "silu"] = param("gelu", "Gate MLP activation "
                                                             "(not stated in the paper; GELU as NeoX).")
    gate_bias_init: float = param(2.0, "Initial bias of the gate logit; positive starts gates "
                                  "open (s≈0.88), an open question in the paper.")
    tau: float = param(1e-4, "Halting threshold on the sigmoid gate (train and inference).")
    halting_loss_weight: float = param(0.1, "lambda of the bottom-k gate loss.")
    halting_k_max: float = param(0.1, "Final fraction of smallest gates in the bottom-k loss.")
    halting_warmup_start: int = param(0, "Step S0 at which the bottom-k fraction starts to rise "
                                      "(cross-entropy only before it).")
    halting_warmup_end: int = param(0, "Step S1 at which the fraction reaches halting_k_max.")
    halted_readout: Literal["last_active", "final"] = param(
        "last_active", "Logits of a halted token: from the iteration where it halted "
        "(last_active, consistent with skipping compute) or from the final pass.")
    kv_reuse_grad: bool = param(True, "Let gradients flow through reused K/V of halted tokens.")
    freeze_backbone: bool = param(False, "Gate-only phase of continued pretraining: train only "
                                  "the gate (or router) parameters.")
    # --- latent thoughts: PonderLM-2 / PonderLM-3 ---
    jacobi_passes: list[int] = param(None, "PonderLM-2 training: Jacobi passes J drawn uniformly "
                                     "from this list each step.", factory=lambda: [2, 3, 4])
    eval_jacobi_passes: int = param(4, "Jacobi passes used in evaluation.")
    thought_embed_scale: float = param(2.5, "PonderLM-2 scales token embeddings by "
                                       "sqrt(scale * d).")
    router_hidden_mult: int = param(1, "PonderLM-3 router MLP width as a multiple of d.")
    compute_penalty: float = param(0.01, "PonderLM-3 weight on the expected number of steps.")
    # --- baselines ---
    pause_tokens: int = param(3, "pause: number of pause tokens inserted after each token.")
    prune_schedule: Literal["uniform", "geometric"] = param(
        "uniform", "fixed_pruning: how the kept fraction falls over iterations.")
    target_flops_ratio: float = param(3.8, "fixed_pruning / random_halting: FLOPs ratio to match "
                                      "(executed / one pass), e.g. a trained AdaPonderLM's.")
