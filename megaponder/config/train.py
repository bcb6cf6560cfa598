"""``train:`` and ``optim:`` — the loop, schedule, precision, checkpoints and logging."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal, Optional, Union

from .base import param


@dataclass
class OptimConfig:
    lr: float = param(1e-3, "Peak learning rate.")
    min_lr_ratio: float = param(0.1, "Cosine decay floor as a fraction of lr (Pythia: 0.1).")
    warmup_steps: int = param(10, "Linear warm-up steps.")
    weight_decay: float = param(0.01, "AdamW weight decay.")
    beta1: float = param(0.9, "AdamW beta1.")
    beta2: float = param(0.95, "AdamW beta2.")
    eps: float = param(1e-8, "AdamW epsilon.")
    fused: bool = param(False, "torch's fused AdamW (one multi-tensor kernel per step; CUDA, "
                        "and CPU from torch 2.4). Same update up to rounding.")
    grad_clip: float = param(1.0, "Global gradient-norm clip; 0 disables. Always passed to "
                             "DeepSpeed explicitly (its own default is 1.0).")


@dataclass
class PhaseConfig:
    """One phase of ``train.phases`` (e.g. AdaPonderLM's gate-only phase, then joint training)."""

    tokens: Optional[float] = param(None, "Length of the phase in training tokens (e.g. 1e9, the "
                                    "AdaPonderLM paper's gate phase), rounded up to whole "
                                    "optimizer steps of global batch x seq_length; null (last "
                                    "phase only): until train.steps.")
    freeze_backbone: bool = param(False, "Train only the family's own parameters (gates, routers, "
                                  "pause embedding) in this phase: the backbone's gradients are "
                                  "zeroed and its learning rate is 0, so AdamW (weight decay "
                                  "included) leaves it bit-identical.")
    lr: Optional[float] = param(None, "Peak learning rate in this phase (the run's warm-up/cosine "
                                "multiplier still applies); null: optim.lr.")


@dataclass
class TrainConfig:
    run_dir: str = param("runs/default", "Run directory: config.yml, metrics.jsonl, checkpoints/.")
    steps: int = param(100, "Number of optimizer steps.")
    seed: int = param(1234, "The one seed that makes a run reproducible.")
    micro_batch_size: int = param(8, "Sequences per micro-batch per data-parallel rank.")
    grad_accum_steps: int = param(1, "Micro-batches accumulated per optimizer step (derived "
                                  "when train.global_batch_size is set).")
    global_batch_size: Optional[int] = param(None, "Sequences per optimizer step over all "
                                             "data-parallel ranks (Megatron's convention: "
                                             "micro_batch_size x dp x grad_accum_steps). When set, "
                                             "grad_accum_steps is derived from the world size, so "
                                             "the config means the same batch on any number of "
                                             "ranks (and a run resumes on another layout); it must "
                                             "be a multiple of micro_batch_size x dp.")
    precision: Literal["fp32", "bf16"] = param("fp32", "Training precision (fp16 is not "
                                                "supported: DeepSpeed refuses it on CPU).")
    log_every: int = param(10, "Write a metrics.jsonl line every N steps.")
    save_every: int = param(0, "Checkpoint every N steps (0: only at the end).")
    eval_every: int = param(0, "Validation every N steps (0: only at the end).")
    eval_batches: int = param(20, "Validation micro-batches per rank per evaluation (with "
                              "data.valid_path: the first windows of the validation files).")
    resume: Union[bool, Literal["auto"]] = param(
        False, "Continue from checkpoints/latest in run_dir (an error when there is none); "
        "`auto`: continue when a checkpoint exists, else start from step 0 (for requeued jobs). "
        "A damaged newest checkpoint falls back to the previous complete one with a warning.")
    overwrite: bool = param(False, "Allow a start from step 0 on a run_dir that holds an "
                            "earlier run (its checkpoints/ and metrics.jsonl are deleted); "
                            "without it such a start is refused.")
    keep_last: int = param(0, "Keep only the N newest checkpoints (0: keep all); the one "
                           "`latest` names is never deleted.")
    max_skipped_steps: int = param(10, "Stop the run (non-zero exit, no checkpoint) after this "
                                   "many updates in a row were skipped for a NaN/Inf loss or "
                                   "gradient norm or a loss spike.")
    loss_spike_factor: float = param(0.0, "Skip an update whose loss exceeds this factor times "
                                     "the running mean of earlier losses (0: off; e.g. 3).")
    loss_spike_warmup: int = param(20, "Good steps before the loss spike rule applies.")
    preempt_signal: Optional[str] = param(None, "An extra signal (e.g. SIGUSR1) that, like "
                                          "SIGTERM and SIGINT, finishes the current step, "
                                          "saves a checkpoint and exits 0.")
    exit_after_minutes: float = param(0.0, "Save and exit 0 after this many minutes of "
                                      "training (0: off), to end inside a job's time limit.")
    wandb_project: Optional[str] = param(None, "Log the metrics.jsonl records to this Weights "
                                         "& Biases project from rank 0 (offline with "
                                         "WANDB_MODE=offline).")
    wandb_run_name: Optional[str] = param(None, "W&B run name (default: the run_dir's name).")
    wandb_entity: Optional[str] = param(None, "W&B entity (team or user); default: yours.")
    phases: list[PhaseConfig] = param(None, "Phase schedule of one run, in order, e.g. "
                                      "[{tokens: 1.0e9, freeze_backbone: true}, {tokens: null}] "
                                      "(continued pretraining: gate-only, then joint). Empty: one "
                                      "phase (ponder.freeze_backbone applies).", factory=list)
    save_universal: bool = param(True, "Also write a layout-free copy of the training state "
                                 "into every checkpoint (universal/: full fp32 weight and Adam "
                                 "moments per parameter), so train.resume works on another "
                                 "(tp, pp, dp, ZeRO stage); costs about 3x the fp32 model size "
                                 "of disk per checkpoint.")
    exit_at_step: Optional[int] = param(None, "Stop (after a checkpoint) once this step is reached, "
                                        "e.g. to fit a job's time limit; the schedule still spans "
                                        "train.steps and train.resume=true continues the run.")
    init_checkpoint: Optional[str] = param(None, "Start weights from this megaponder checkpoint "
                                           "(e.g. one converted from Pythia); optimizer starts fresh.")
    tensorboard: bool = param(False, "Also write TensorBoard event files to run_dir/tb.")
    progress_bar: bool = param(True, "Show a progress bar on rank 0.")
    peak_tflops: Optional[float] = param(None, "Peak dense TFLOP/s of one device at the training "
                                         "precision, for the MFU column of metrics.jsonl; null: "
                                         "the CUDA device's datasheet figure "
                                         "(megaponder/train/accelerators.py: H100/H200/A100/L40S/"
                                         "MI300X), no MFU on CPU or an unknown device.")
    profile_steps: list[int] = param(None, "[first, last] optimizer steps (1-based, as in "
                                     "metrics.jsonl) to record with torch.profiler: CPU and CUDA "
                                     "activity, tensor memory and shapes, written to "
                                     "run_dir/profile/ as TensorBoard traces (Chrome-trace JSON, "
                                     "open in Perfetto or chrome://tracing). Empty: off.",
                                     factory=list)
    memory_gb: Optional[float] = param(None, "Memory of one device in GB, for the check that "
                                       "refuses a micro-batch that cannot fit (megaponder plan); "
                                       "null: the CUDA device's total memory, on CPU the host's "
                                       "RAM divided by the processes of this node.")
    threads: int = param(0, "torch CPU threads (0: leave torch's default).")


def signal_from_name(name: str) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"`` or ``"10"`` -> the signal; a ValueError says what exists."""
    text = str(name).strip().upper()
    if text.isdigit():
        return signal.Signals(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"train.preempt_signal={name!r} is not a signal name "
                         f"(e.g. SIGTERM, SIGUSR1, SIGUSR2)") from None


def train_config_problems(t) -> list[str]:
    """The run-safety rules of the ``train:`` section (megaponder.config.validate)."""
    problems = []
    if not str(t.run_dir).strip():
        problems.append("train.run_dir is empty; name the run directory (e.g. runs/my-run).")
    if not 0 <= t.seed < 2 ** 32:  # numpy's generators (data order, init) take 32-bit seeds
        problems.append(f"train.seed must be between 0 and 2**32-1 = 4294967295 (got {t.seed}).")
    if t.keep_last < 0:
        problems.append(f"train.keep_last must be >= 0 (got {t.keep_last}; 0 keeps all).")
    if t.max_skipped_steps < 1:
        problems.append(f"train.max_skipped_steps must be >= 1 (got {t.max_skipped_steps}).")
    if t.loss_spike_factor < 0 or 0 < t.loss_spike_factor <= 1:
        problems.append(f"train.loss_spike_factor must be 0 (off) or > 1 (got {t.loss_spike_factor}).")
    if t.exit_after_minutes < 0:
        problems.append(f"train.exit_after_minutes must be >= 0 (got {t.exit_after_minutes}).")
    if t.preempt_signal:
        try:
            sig = signal_from_name(t.preempt_signal)
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                problems.append(f"train.preempt_signal={t.preempt_signal} cannot be caught; "
                                f"use e.g. SIGUSR1.")
        except ValueError as err:
            problems.append(str(err) + ".")
    return problems
