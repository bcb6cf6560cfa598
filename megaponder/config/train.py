"""``train:`` and ``optim:`` — the loop, schedule, precision, checkpoints and logging."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

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
class TrainConfig:
    run_dir: str = param("runs/default", "Run directory: config.yml, metrics.jsonl, checkpoints/.")
    steps: int = param(100, "Number of optimizer steps.")
    seed: int = param(1234, "The one seed that makes a run reproducible.")
    micro_batch_size: int = param(8, "Sequences per micro-batch per data-parallel rank.")
    grad_accum_steps: int = param(1, "Micro-batches accumulated per optimizer step.")
    precision: Literal["fp32", "bf16"] = param("fp32", "Training precision (fp16 is not "
                                                "supported: DeepSpeed refuses it on CPU).")
    log_every: int = param(10, "Write a metrics.jsonl line every N steps.")
    save_every: int = param(0, "Checkpoint every N steps (0: only at the end).")
    eval_every: int = param(0, "Validation every N steps (0: only at the end).")
    eval_batches: int = param(20, "Validation micro-batches per rank per evaluation (with "
                              "data.valid_path: the first windows of the validation files).")
    resume: bool = param(False, "Continue from checkpoints/latest in run_dir.")
    exit_at_step: Optional[int] = param(None, "Stop (after a checkpoint) once this step is reached, "
                                        "e.g. to fit a job's time limit; the schedule still spans "
                                        "train.steps and train.resume=true continues the run.")
    init_checkpoint: Optional[str] = param(None, "Start weights from this megaponder checkpoint "
                                           "(e.g. one converted from Pythia); optimizer starts fresh.")
    tensorboard: bool = param(False, "Also write TensorBoard event files to run_dir/tb.")
    progress_bar: bool = param(True, "Show a progress bar on rank 0.")
    peak_tflops: Optional[float] = param(None, "Peak dense TFLOP/s of one device at the training "
                                         "precision, for the MFU column of metrics.jsonl (H100/H200 "
                                         "SXM bf16: 989); null logs no MFU.")
    threads: int = param(0, "torch CPU threads (0: leave torch's default).")
