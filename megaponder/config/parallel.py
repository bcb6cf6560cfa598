"""``parallel:`` — tensor / pipeline / data parallel layout and DeepSpeed ZeRO."""
from __future__ import annotations

from dataclasses import dataclass

from .base import param


@dataclass
class ParallelConfig:
    """Data parallel degree is derived: world_size / (tp * pp)."""

    tp: int = param(1, "Tensor-parallel degree (Megatron style).")
    pp: int = param(1, "Pipeline-parallel degree.")
    zero_stage: int = param(0, "DeepSpeed ZeRO stage 0-3 (stages 2/3 cannot be combined with pp>1).")
    sequence_parallel: bool = param(False, "Shard LayerNorm/dropout regions over the sequence "
                                    "across the tensor-parallel group (requires tp>1).")
    pipeline_microbatches: int = param(1, "Micro-batches per pipeline step (>= pp keeps the "
                                       "pipeline busy).")
    activation_checkpointing: bool = param(False, "Recompute each layer's activations in backward.")
    dist_backend: str = param("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU), "
                              "nccl or gloo.")
