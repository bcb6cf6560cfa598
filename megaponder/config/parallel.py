"""``parallel:`` — tensor / pipeline / data parallel layout and DeepSpeed ZeRO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import param

@dataclass
class ParallelConfig:
    """Data parallel degree is derived: world_size / (tp * pp)."""

    tp: int = param(1, "Tensor-parallel degree (Megatron style).")
    pp: int = param(1, "Pipeline-parallel degree.")
    zero_stage: int = param(0, "DeepSpeed ZeRO stage 0-3 (stages 2/3 cannot be combined with pp>1).")
    sequence_parallel: bool = param(False, "Shard LayerNorm/dropout regions over the sequence "
                                    "across the tensor-parallel group (requires tp>1). Vanilla: "
                                    "the whole model; ponderlm, adaponderlm, fixed_pruning, "
                                    "random_halting: inside the stack; other families: refused.")
    pipeline_chunks: int = param(4, "With pp>1, every stack call (one pondering iteration / "
                                 "Jacobi pass) splits its micro-batch rows into this many "
                                 "chunks that flow through the stages one after another, so "
                                 "stage r works on chunk i while stage r+1 works on chunk i-1: "
                                 "bubble (pp-1)/(chunks+pp-1) per stack call instead of "
                                 "(pp-1)/pp. Capped at the micro-batch size; 1 = no overlap.")
    shard_vocab_over_pp: bool = param(False, "With pp>1, split the embedding and output head "
                                      "over all tp x pp ranks of a model replica instead of "
                                      "over tp only (replicated over pp). Saves (1 - 1/pp) of "
                                      "their memory and of the head's per-iteration compute; "
                                      "costs an all-reduce of the embedding output and of the "
                                      "head-input gradient over tp x pp ranks.")
    activation_checkpointing: Literal["none", "layer", "iteration"] = param(
        "none", "Recompute activations in backward instead of keeping them. layer: each layer "
        "is recomputed on its own (keeps every layer's input, per iteration). iteration: this "
        "rank's layers of one stack call (one pondering iteration / Jacobi pass) are recomputed "
        "together (keeps one hidden state per iteration; peak adds one iteration's activations).")
    timeout_minutes: float = param(30.0, "Process-group timeout: the rendezvous and every "
                                   "collective (all-reduce, barrier, broadcast) of the run "
                                   "fail after waiting this long for a stuck or dead rank, and "
                                   "the run stops with one line naming it (docs/training.md, "
                                   "failure handling). Must exceed the longest legitimate "
                                   "wait, e.g. rank 0 writing a checkpoint or building the "
                                   "sample index while the others wait.")
    zero_bucket_size: int = param(500_000_000, "ZeRO 1-3: elements of DeepSpeed's gradient reduce "
                                  "and parameter all-gather buckets (its reduce_bucket_size and "
                                  "allgather_bucket_size; DeepSpeed's default 5e8). Every ZeRO run "
                                  "allocates one reduce bucket of this many fp32 elements (2 GB at "
                                  "5e8) whatever the model size; megaponder plan counts it.")
    dist_backend: str = param("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU), "
                              "nccl or gloo.")
