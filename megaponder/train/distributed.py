"""Process start-up for training: rank/world from the launcher, then torch.distributed.

A single process gets a private loopback rendezvous so that the DeepSpeed engine (which
needs an initialised process group) runs the same path as a multi-node job.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> DistInfo:
    """Rank/world/local rank from torchrun or the deepspeed launcher (RANK...), mpirun
    (OMPI_COMM_WORLD_*) or SLURM (SLURM_PROCID...), exported as RANK/WORLD_SIZE/LOCAL_RANK."""
    env = os.environ
    sources = [("RANK", "WORLD_SIZE", "LOCAL_RANK"),
               ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
               ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")]
    for rank_var, world_var, local_var in sources:
        if rank_var in env and world_var in env:
            info = DistInfo(int(env[rank_var]), int(env[world_var]), int(env.get(local_var, 0)))
            break
    else:
        info = DistInfo(0, 1, 0)
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    if info.world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in env:
        raise RuntimeError("multi-process run without MASTER_ADDR/MASTER_PORT: start it with "
                           "torchrun, the deepspeed launcher, or export MASTER_ADDR and "
                           "MASTER_PORT (examples/slurm/ does this for SLURM and mpirun).")
    return info


def init_distributed(backend: str = "auto") -> DistInfo:
    info = launcher_env()
    if not torch.distributed.is_initialized():
        import deepspeed

        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        # auto_mpi_discovery would take MASTER_ADDR from `hostname -I`; we mapped env ourselves.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info
