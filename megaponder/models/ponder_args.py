"""``ponder:`` — settings of the pondering families and their baselines.

Where the papers leave a choice open (docs/papers.md marks them), the field's help says
so and the default is the most likely reading. docs/families.md explains every family and
which field belongs to which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .args import param


@dataclass
class PonderConfig:
    # --- shared by every recurrent family -----------------------------------------------------
    steps: int = param(3, "Pondering steps K. Vertical families (ponderlm, adaponderlm, loop, "
                       "fixed_pruning, random_halting): the stack runs K+1 times (PonderLM/"
                       "AdaPonderLM default 3, i.e. 4 iterations). Latent families (ponderlm2, "
                       "ponderlm3): thoughts per token (K_max for ponderlm3).")
    scale_embeds: bool = param(True, "Scale token embeddings: by sqrt(d) in the vertical pondering "
                               "families (PonderLM code; the pondering embedding gets the same "
                               "scale) and pause, by sqrt(thought_embed_scale*d) in ponderlm2/"
                               "ponderlm3 and loop (the PonderLM-2 code's baselines).")
    multiply_steps: bool = param(False, "PonderLM 'mutiply_pondering_steps': multiply the first "
                                 "input embedding by K (the official scripts turn it on from "
                                 "410M up).")
    top_k: int = param(0, "Pondering embedding from the softmax over the top-k logits only "
                       "(0: full softmax; the paper's ablation finds top-100 equivalent).")
    depth_scaled_init: Optional[bool] = param(
        None, "Depth factor of the recurrent families' init: the output projections (attn.out, "
        "mlp.fc2) get the (K+1) of sigma/sqrt(2*L*(K+1)) (init_method official; the other "
        "schemes divide their std by sqrt(K+1)). null follows the papers' code: on neox for "
        "the recurrent families (PonderLM/PonderLM-2 GPT-NeoX files), never on llama (their "
        "Llama files); true/false force it on/off. Vanilla and pause never get it (one pass).")
    sample_seed: int = param(0, "Seed of the model's own random draws (PonderLM-2 Jacobi count, "
                             "random/fixed pruning); combined with the training step so a run "
                             "is reproducible and resumes identically.")
    # --- AdaPonderLM gates and halting --------------------------------------------------------
    gate_hidden_mult: int = param(4, "Gate MLP hidden width as a multiple of d (paper: '4h'; "
                                  "unconfirmed).")
    gate_activation: Literal["gelu", "relu", "silu"] = param("gelu", "Gate (and router) MLP "
                                                             "activation (not stated; GELU as NeoX).")
    gate_bias_init: float = param(2.0, "Initial bias of the gate logit; positive starts gates "
                                  "open (s=0.88), an open question in the paper.")
    gate_preserve_tol: Optional[float] = param(1e-3, "AdaPonderLM started from a PonderLM "
                                               "checkpoint (train.init_checkpoint): every gate "
                                               "starts at s = 1 - tol for every token (output "
                                               "weights 0, bias logit(1 - tol)), so step 0 "
                                               "computes the loaded PonderLM up to tol times "
                                               "its pondering update; null keeps "
                                               "gate_bias_init (s = 0.88 scales the update).")
    tau: float = param(1e-4, "Halting threshold: AdaPonderLM halts a token for good once its gate "
                       "s < tau; PonderLM-3 prunes steps whose survival w < tau (train and "
                       "inference).")
    halting_loss_weight: float = param(0.1, "lambda of the bottom-k gate loss.")
    halting_k_max: float = param(0.1, "Final fraction of smallest gates in the bottom-k loss.")
    halting_warmup_start: int = param(0, "Step S0 at which the bottom-k fraction starts to rise "
                                      "(cross-entropy only before it; not given in the paper).")
    halting_warmup_end: int = param(0, "Step S1 at which the fraction reaches halting_k_max "
                                    "(linear from S0; S1 = S0 switches it on at once).")
    bottomk_pool: Literal["active", "all"] = param(
        "active", "Which gate values enter the bottom-k pool: only those evaluated on still-"
        "active tokens (a halted token's later gates cannot change anything) or all (open "
        "question 4 of the paper). k is always the fraction of *all* gate slots, so shapes "
        "stay static.")
    halted_readout: Literal["last_active", "final"] = param(
        "last_active", "Logits of a halted token: from the iteration where it halted "
        "(last_active, consistent with skipping compute) or from a final pass that recomputes "
        "every token's query row on the reused K/V (final).")
    kv_reuse_grad: bool = param(True, "Let gradients flow through the reused K/V of halted tokens "
                                "(false detaches them; a pipeline-parallel run may need false).")
    train_compaction: bool = param(
        False, "AdaPonderLM and the halting baselines: at every pass after the first, run the "
        "stack only on the tokens still active (all rows' packed into one flat sequence, queries "
        "at their positions, keys over their whole row with halted tokens' reused K/V) instead "
        "of all tokens with a "
        "where-select. Equal to the dense forward and gradients (halting is a hard threshold); "
        "needs halted_readout last_active, bottomk_pool active, parallel.tp 1 and pp 1. "
        "Speed: see BENCHMARKS.md (bench_train_compaction).")
    freeze_backbone: bool = param(False, "Gate-only phase of continued pretraining: train only "
                                  "the gate (or router) parameters; the trainer freezes the rest.")
    # --- latent thoughts: PonderLM-2 / PonderLM-3 / pause -------------------------------------
    jacobi_passes: list[int] = param(None, "PonderLM-2/3 training: Jacobi passes J drawn uniformly "
                                     "from this list each step (code: randint(2,5)).",
                                     factory=lambda: [2, 3, 4])
    eval_jacobi_passes: int = param(3, "Jacobi passes outside training in eval_mode official "
                                    "(code: num_jacobi_iterations=3).")
    eval_mode: Literal["exact", "official"] = param(
        "exact", "PonderLM-2/3 outside training (megaponder eval, validation, analysis): 'exact' "
        "runs Jacobi passes until no thought changes by more than eval_jacobi_tol (the sequential "
        "chain the cached decoder computes; at most tokens*(K+1) passes, where Jacobi on a "
        "causal chain is exact); 'official' runs eval_jacobi_passes passes as the official code.")
    eval_jacobi_tol: float = param(1e-5, "eval_mode exact: stop once the largest change of any "
                                   "thought over one Jacobi pass is below this (thoughts are "
                                   "final-norm hidden states, O(1) entries).")
    eval_hard_prune: bool = param(True, "PonderLM-3 outside training: prune steps with w < tau "
                                  "as the decoder does (their keys masked, no mixture weight), so "
                                  "perplexity and flops_ratio describe the same computation; "
                                  "false evaluates with the soft training bias.")
    buildup_passes: bool = param(True, "Run the K build-up passes of the official code (one "
                                 "stage added per pass) before the Jacobi passes; false starts "
                                 "every thought at zero.")
    thought_embed_scale: float = param(2.5, "PonderLM-2/3 scale token embeddings by "
                                       "sqrt(scale * d) when scale_embeds.")
    router_hidden_mult: int = param(1, "PonderLM-3 router MLP width as a multiple of d "
                                    "(architecture not given in the paper).")
    router_bias_init: float = param(0.0, "PonderLM-3: initial bias of the router logit of the "
                                    "K_max-steps outcome (0: uniform start over 0..K).")
    router_temperature: float = param(1.0, "PonderLM-3: the router's softmax temperature "
                                      "(s = softmax(logits / T); not in the paper, an ablation "
                                      "knob against router collapse).")
    router_warmup_steps: int = param(0, "PonderLM-3: training steps with a uniform router "
                                     "(logits zeroed, no router gradient) so every stage's "
                                     "readout trains first (not in the paper; ablation knob).")
    router_lr_mult: float = param(1.0, "PonderLM-3: learning rate of the router's parameters "
                                  "as a multiple of optim.lr (an optimizer parameter group of "
                                  "their own, on the same schedule; not in the paper, an "
                                  "ablation knob against router saturation).")
    compute_penalty: float = param(0.01, "PonderLM-3 weight of the compute penalty (form and "
                                   "weight not given in the paper; see compute_penalty_form).")
    compute_penalty_form: Literal["expected_steps", "kl_geometric"] = param(
        "expected_steps", "PonderLM-3 compute penalty: 'expected_steps' charges the mean "
        "expected number of extra steps sum_{k>=1} w_k (the expected inference cost); "
        "'kl_geometric' is PonderNet's regulariser, KL(s_t || truncated geometric prior over "
        "0..K with halting probability penalty_prior_halt), which keeps each token's step "
        "distribution from saturating (ablation knob; the paper's form is not known).")
    penalty_prior_halt: float = param(0.5, "PonderLM-3 with compute_penalty_form kl_geometric: "
                                      "the prior's per-step halting probability lambda_p "
                                      "(prior_k proportional to lambda_p (1 - lambda_p)^k).")
    bias_own_steps: bool = param(True, "PonderLM-3: add log w of a latent key also for the "
                                 "token's own later steps (true) or only for later tokens "
                                 "(open question 3).")
    train_hard_prune: bool = param(False, "PonderLM-3: in training too, mask keys with w < tau "
                                   "exactly and drop their mixture weight (train = inference "
                                   "for any router output); false keeps the paper's soft log-w "
                                   "bias everywhere.")
    renormalize_pruned: bool = param(False, "PonderLM-3 inference: renormalise the mixture "
                                     "weights over the kept steps (open question 4).")
    # --- baselines ----------------------------------------------------------------------------
    pause_tokens: int = param(3, "pause: number of pause tokens inserted after each token.")
    prune_schedule: Literal["uniform", "geometric"] = param(
        "uniform", "fixed_pruning: how the kept fraction falls over iterations (uniform: the "
        "same number of tokens exits at every iteration; geometric: a constant fraction).")
    target_mean_iters: Optional[float] = param(None, "fixed_pruning / random_halting: backbone "
                                               "passes per token to match, the papers' scale "
                                               "(AdaPonderLM's '3.8x' is this number; use a "
                                               "trained AdaPonderLM's logged mean_iters). With "
                                               "neither target set the baselines use 3.8.")
    target_flops_ratio: Optional[float] = param(None, "fixed_pruning / random_halting: match "
                                                "this inference flops_ratio instead (flops.py "
                                                "scale: head, pondering embedding and gates "
                                                "counted). The baselines have no gates, so at "
                                                "an AdaPonderLM's flops_ratio they run slightly "
                                                "more passes than it; set at most one target.")
    halting_rate: Optional[float] = param(None, "random_halting: per-iteration halting "
                                          "probability; null derives it from "
                                          "target_flops_ratio.")
