"""Process topology: rank/world from any launcher, tp x pp x dp process groups, RNG streams.

Rank layout (Megatron / GPT-NeoX order): tensor-parallel rank varies fastest, then data
parallel, then pipeline::

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a TP group is ``tp`` consecutive ranks (one node on a GPU cluster) and pipeline neighbours
are ``dp * tp`` ranks apart.

Launchers understood by :func:`launcher_env` (first match wins):

===================  =============================================================
torchrun / deepspeed ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (deepspeed also passes
                     ``--local_rank=N`` on argv: :func:`strip_local_rank_arg`)
mpirun (OpenMPI)     ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``
Intel MPI / MPICH    ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``
SLURM (srun)         ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; master from
                     the first host of ``SLURM_JOB_NODELIST``
===================  =============================================================

MASTER_ADDR defaults to 127.0.0.1 (never ``hostname -I``, which DeepSpeed's MPI discovery
uses and which picks a non-loopback address), MASTER_PORT to 29500.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..nodelist import expand_nodelist  # torch-free (examples/slurm/make_hostfile.py uses it)

DEFAULT_PORT = 29500
DEFAULT_TIMEOUT_MINUTES = 30.0  # torch's default for gloo; parallel.timeout_minutes sets it per run


# --------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "env" (torchrun/deepspeed), "openmpi", "pmi", "slurm" or "single"


def _int(env, name, default=None):
    value = env.get(name)
    return default if value in (None, "") else int(value)


def launcher_env(environ: Optional[dict] = None) -> LaunchInfo:
    """Rank, world, local rank and rendezvous address from whichever launcher started us."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR")
    port = _int(env, "MASTER_PORT", DEFAULT_PORT)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, our own spawns
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", 1))
        source = "env"
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
        source = "openmpi"
    elif "PMI_RANK" in env:
        rank, world = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local = _int(env, "MPI_LOCALRANKID", 0)
        local_world = _int(env, "MPI_LOCALNRANKS", 1)
        source = "pmi"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = _int(env, "SLURM_LOCALID", 0)
        per_node = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0]
        local_world = int(per_node) if per_node.isdigit() else 1
        if addr is None and env.get("SLURM_JOB_NODELIST"):
            hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
            addr = hosts[0] if len(hosts) > 1 else "127.0.0.1"
        source = "slurm"
    else:
        rank, world, local, local_world, source = 0, 1, 0, 1, "single"
    if addr is None:
        addr = "127.0.0.1"
    return LaunchInfo(rank, world, local, local_world, addr, port, source)


def strip_local_rank_arg(argv: Optional[list[str]] = None) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (the deepspeed launcher adds it) from
    argv, exporting it as LOCAL_RANK. Returns the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ["LOCAL_RANK"] = a.split("=", 1)[1]
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def export_launcher_env(info: LaunchInfo) -> None:
    """Write RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so torch and DeepSpeed see one convention."""
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ.setdefault("LOCAL_SIZE", str(info.local_world_size))
    os.environ["MASTER_ADDR"] = info.master_addr
    os.environ["MASTER_PORT"] = str(info.master_port)


# --------------------------------------------------------------------------- topology
def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return pp_rank * dp * tp + dp_rank * tp + tp_rank


def coords_of(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def group_ranks(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """All tp / dp / pp / model-parallel (tp x pp) rank lists, in creation order."""
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tp*pp={tp * pp}")
    dp = world_size // (tp * pp)
    tp_g = [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_g = [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_g = [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_g = [sorted(rank_of(t, d, p, tp, dp) for p in range(pp) for t in range(tp)) for d in range(dp)]
    return {"tp": tp_g, "dp": dp_g, "pp": pp_g, "mp": mp_g}


@dataclass
class Topology:
    """Where this process sits in the tp x dp x pp grid, with its process groups.

    Groups are ``None`` in a single process that has not initialised torch.distributed;
    every collective helper in megaponder.parallel is then a no-op.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None          # tp x pp: everything one model replica spans
    pp_ranks: list = field(default_factory=lambda: [0])  # global ranks of my pipeline group
    tp_ranks: list = field(default_factory=lambda: [0])
    dp_ranks: list = field(default_factory=lambda: [0])
    sequence_parallel: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def mp_rank(self) -> int:
        """Rank inside the model-parallel (tp x pp) group."""
        return self.pp_rank * self.tp + self.tp_rank

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp}, "
                f"pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}")

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


def build_topology(tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                   timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Topology:
    """Create the tp/dp/pp/mp process groups (every rank must call this, in the same order).
    ``timeout_minutes`` as for the default group: ``new_group`` does not inherit it (torch
    falls back to its own default, 30 min for gloo)."""
    from datetime import timedelta

    if not dist.is_initialized():
        if tp * pp != 1:
            raise RuntimeError("tp*pp > 1 needs an initialised process group "
                               "(call megaponder.parallel.init_distributed first)")
        return Topology(sequence_parallel=sequence_parallel)
    world, rank = dist.get_world_size(), dist.get_rank()
    lists = group_ranks(world, tp, pp)
    dp = world // (tp * pp)
    mine: dict[str, Any] = {}
    for kind, all_ranks in lists.items():
        for ranks in all_ranks:
            g = dist.new_group(ranks, timeout=timedelta(minutes=timeout_minutes))
            if rank in ranks:
                mine[kind] = (g, ranks)
    tp_rank, dp_rank, pp_rank = coords_of(rank, tp, dp)
    return Topology(world_size=world, rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    tp=tp, pp=pp, dp=dp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
                    tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0],
                    mp_group=mine["mp"][0], pp_ranks=mine["pp"][1], tp_ranks=mine["tp"][1],
                    dp_ranks=mine["dp"][1], sequence_parallel=sequence_parallel)


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed's comm backend from building and mapping its CPU shared-memory op.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (~30 s of g++)
    when its comm backend starts and, when LOCAL_SIZE equals the world size, maps a 69 MB
    /dev/shm buffer per rank that it never unlinks: every run leaks them until /dev/shm (RAM)
    is full. Only DeepSpeed-Inference's ``inference_all_reduce`` uses the op; training talks
    through torch.distributed. DeepSpeed consults its cached op-compatibility table before
    building, so marking the op incompatible there skips both the compile and the buffers."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_process_group(backend: str = "auto",
                       timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Map the launcher's environment and initialise torch.distributed's default group
    (through DeepSpeed so its comm layer is ready too), no-op when already initialised. Safe
    in a single process: it then uses a private loopback rendezvous so the DeepSpeed engine
    path is the same. ``timeout_minutes`` bounds the rendezvous and every collective of the
    run (gloo raises on the waiting ranks; NCCL's watchdog aborts them)."""
    info = launcher_env()
    if info.source == "single" and "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            info = LaunchInfo(0, 1, 0, 1, "127.0.0.1", s.getsockname()[1], "single")
    export_launcher_env(info)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if not dist.is_initialized():
        from datetime import timedelta

        import deepspeed
        skip_cpu_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=timeout_minutes))


def init_distributed(tp: int = 1, pp: int = 1, *, backend: str = "auto",
                     sequence_parallel: bool = False, seed: Optional[int] = None,
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Topology:
    """:func:`init_process_group`, then the tp/pp/dp process groups and, with ``seed``, the
    RNG streams."""
    init_process_group(backend, timeout_minutes)
    topo = build_topology(tp, pp, sequence_parallel, timeout_minutes)
    if seed is not None:
        seed_everything(seed, topo)
    return topo


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed expects (Megatron naming). DeepSpeed uses the data
    parallel group for gradient reduction and the model-parallel group (tp x pp) to sum the
    gradient norm; megaponder.parallel.parallelize marks every parameter so that each unique
    gradient element is counted once (see ``mark_norm_ownership``)."""

    def __init__(self, topo: Topology):
        self.topo = topo

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_rank(self):
        return self.topo.dp_rank

    def get_data_parallel_world_size(self):
        return self.topo.dp

    def get_data_parallel_group_ranks(self):
        return list(self.topo.dp_ranks)

    def get_model_parallel_group(self):
        return self.topo.mp_group

    def get_model_parallel_rank(self):
        return self.topo.mp_rank

    def get_model_parallel_world_size(self):
        return self.topo.tp * self.topo.pp

    def get_tensor_model_parallel_group(self):
        return self.topo.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.topo.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.topo.tp

    def get_tensor_model_parallel_src_rank(self):
        return self.topo.tp_ranks[0]

    def get_pipeline_model_parallel_group(self):
        return self.topo.pp_group

    def get_pipeline_model_parallel_rank(self):
        return self.topo.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.topo.pp


# --------------------------------------------------------------------------- RNG
class RNGStreams:
    """Two RNG streams, as in Megatron: the default one (same on every TP rank of a
    pipeline stage, so dropout in replicated regions agrees across TP ranks) and a
    per-TP-rank one for regions whose tensors are sharded over TP (attention dropout on the
    local heads, sequence-parallel dropout), entered with ``with rng.tensor_parallel():``."""

    TP_OFFSET = 2718

    def __init__(self):
        self._tp_state: Optional[torch.Tensor] = None
        self._tp_cuda_state = None

    def seed(self, seed: int, topo: Topology) -> None:
        base = seed + 100 * topo.pp_rank
        torch.manual_seed(base)
        gen = torch.Generator().manual_seed(base + self.TP_OFFSET + topo.tp_rank)
        self._tp_state = gen.get_state()
        if torch.cuda.is_available():
            cur = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(base + self.TP_OFFSET + topo.tp_rank)
            self._tp_cuda_state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(cur)
            torch.cuda.manual_seed(base)

    def state_dict(self) -> dict:
        return {"tp": self._tp_state, "tp_cuda": self._tp_cuda_state}

    def load_state_dict(self, state: dict) -> None:
        self._tp_state, self._tp_cuda_state = state["tp"], state["tp_cuda"]

    def checkpoint_contexts(self):
        """(forward, recompute) context managers for ``torch.utils.checkpoint``'s
        ``context_fn``: the recompute replays the per-TP-rank stream from where the forward
        started, so recomputed dropout masks equal the forward's (torch restores only the
        default stream), and leaves the stream where the forward left it."""
        snapshot = {}

        @contextlib.contextmanager
        def forward():
            snapshot["state"] = self.state_dict()
            yield

        @contextlib.contextmanager
        def recompute():
            current = self.state_dict()
            self.load_state_dict(snapshot["state"])
            try:
                yield
            finally:
                self.load_state_dict(current)

        return forward(), recompute()

    @contextlib.contextmanager
    def tensor_parallel(self):
        if self._tp_state is None:
            yield
            return
        saved = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if self._tp_cuda_state is not None else None
        torch.set_rng_state(self._tp_state)
        if saved_cuda is not None:
            torch.cuda.set_rng_state(self._tp_cuda_state)
        try:
            yield
        finally:
            self._tp_state = torch.get_rng_state()
            torch.set_rng_state(saved)
            if saved_cuda is not None:
                self._tp_cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


RNG = RNGStreams()


def seed_everything(seed: int, topo: Topology) -> None:
    """Seed python/numpy/torch for this rank: identical across TP and DP ranks of a stage
    (so replicated dropout masks agree), plus the per-TP-rank stream (``RNG``)."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2**32))
    RNG.seed(seed, topo)


def checkpointed_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` recomputed in backward (non-reentrant torch checkpoint). Dropout
    masks repeat in the recompute: torch restores the default RNG stream,
    ``RNG.checkpoint_contexts`` the per-TP-rank one. TP collectives inside ``fn`` run again,
    identically on every TP rank."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=RNG.checkpoint_contexts, **kwargs)
