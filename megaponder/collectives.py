"""The collective helpers every layer shares (a leaf: it imports torch and megaponder.errors
only): where collective tensors live, rank reductions of a flag, start-up failures that every
rank agrees on, and a clear line when a collective times out.

A rank that raises during start-up (a damaged file on its node, a checkpoint file only it
reads, a config problem found late) used to leave the other ranks waiting in the next
collective until the process-group timeout. Each start-up phase therefore runs inside
:func:`agree_on_failure`: the block runs collective-free, then one all-reduce of a per-rank
failure flag tells every rank which ranks failed, so they all stop together::

    with agree_on_failure("data checks"):
        check_data_fits(cfg)          # may raise on some ranks only

- a failing rank re-raises its own error; the first failing rank prints it (and any other
  whose message differs), so a mistake every rank makes (the common case: same config, same
  shared files) is still printed once;
- every other rank raises :class:`PeerFailed`, ``start-up failed on rank R (<phase>):
  <R's message>``; rank 0 prints it, so the job log says what went wrong even when the
  failing rank's own output lands elsewhere (another node's log).

Everything after start-up relies on the process-group timeout (``parallel.timeout_minutes``):
a collective that a stuck or dead rank never joins raises on the waiting ranks, which
:func:`describe_timeout` turns into one line.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .errors import UserError, mark_report_here, one_line


class PeerFailed(UserError):
    """Another rank failed during start-up; this rank stops with it (exit code 2)."""


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_minutes``."""


def multi_process() -> bool:
    """A torch.distributed group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where tensors handed to torch.distributed collectives must live: NCCL moves CUDA
    tensors only, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: int | bool, device=None) -> bool:
    """True when ``flag`` is set on any rank (one all-reduce; no-op without a process group)."""
    return bool(max_over_ranks(int(bool(flag)), device))


def max_over_ranks(value: int, device=None) -> int:
    """The largest ``value`` of all ranks (one all-reduce; no-op without a process group):
    a verdict with several levels in one collective."""
    if not multi_process():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int32, device=device or collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank_on_device(flag: torch.Tensor) -> bool:
    """:func:`any_rank` of a 0-d device tensor: one all-reduce (MAX) where the collective
    backend wants it, then the one host read of the step."""
    if multi_process():
        flag = flag.to(device=collective_device(), dtype=torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.reshape(-1)[0])


@contextlib.contextmanager
def agree_on_failure(phase: str) -> Iterator[None]:
    """Run a collective-free start-up block, then agree across ranks on whether it failed
    (one all-reduce of a world-sized int tensor; one broadcast more only on failure).
    Without a process group it is a plain block. Every rank must enter the same phases in
    the same order. KeyboardInterrupt/SystemExit pass straight through."""
    error: Optional[Exception] = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
        if not multi_process():
            raise
        error = err
    if not multi_process():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int32, device=collective_device())
    flags[rank] = int(error is not None)
    dist.all_reduce(flags)
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    first = failed[0]
    box = [_summary(error) if rank == first else None]
    dist.broadcast_object_list(box, src=first)
    message = box[0]
    if error is not None:
        mark_report_here(error, rank == first or _summary(error) != message)
        raise error
    more = f" and {len(failed) - 1} other rank(s)" if len(failed) > 1 else ""
    peer = PeerFailed(f"start-up failed on rank {first}{more} ({phase}): {message}")
    mark_report_here(peer, rank == 0)
    raise peer


def _summary(err: BaseException) -> str:
    """The one line other ranks print: a user error's message, a bug's type and message."""
    return one_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {one_line(err)}"


class PeerLost(CollectiveTimeout):
    """A peer's connection closed in the middle of a collective: that rank died."""


# how gloo words a peer that went away (its process died, its node rebooted)
_PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
ROLL_CALL_SECONDS = 3.0


def _missing_ranks(rank: int, world: int) -> Optional[list[int]]:
    """The ranks that do not answer a roll call on the rendezvous store within
    :data:`ROLL_CALL_SECONDS` (None when the store itself is gone). Two ranks: the other one."""
    if world == 2:
        return [1 - rank]
    import datetime
    import time

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=ROLL_CALL_SECONDS))
        store.set(f"megaponder/roll_call/{rank}", "1")
        deadline = time.time() + ROLL_CALL_SECONDS
        keys = [f"megaponder/roll_call/{r}" for r in range(world)]
        while time.time() < deadline and not store.check(keys):
            time.sleep(0.1)
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except Exception:  # noqa: BLE001 - the store lived on the dead rank: unknown
        return None


def describe_peer_loss(err: BaseException) -> Optional[PeerLost]:
    """A one-line :class:`PeerLost` naming the dead rank(s) for a collective that failed
    because a peer went away, else None. Call it before destroying the process group."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not any(m in text for m in _PEER_LOST_MARKERS):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    missing = _missing_ranks(rank, world)
    who = (f"rank {', '.join(map(str, missing))}" if missing else "a peer rank")
    return PeerLost(f"rank {rank}: {who} died during a collective (its connection closed); its "
                    f"own log says why (killed, out of memory, node lost). Resume with --set "
                    f"train.resume=auto once it is fixed.")


# how torch.distributed words a timeout: gloo's collectives, the rendezvous store, NCCL's watchdog
_TIMEOUT_MARKERS = ("Timed out waiting", "Timed out after",
                    "Watchdog caught collective operation timeout")


def describe_timeout(err: BaseException, timeout_minutes: float) -> Optional[CollectiveTimeout]:
    """A :class:`CollectiveTimeout` for an error that is a collective's (or the rendezvous')
    timeout, else None."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not any(m in text for m in _TIMEOUT_MARKERS):
        return None
    # before the group exists (a rendezvous timeout) the launcher's rank, exported by init
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else os.environ.get("RANK", 0)
    return CollectiveTimeout(
        f"rank {rank}: a collective did not complete within parallel.timeout_minutes="
        f"{timeout_minutes:g}: another rank is stuck, died or is far slower (see its log); if "
        f"the wait was legitimate (e.g. a save to a slow file system), raise "
        f"parallel.timeout_minutes. ({one_line(err)[:200]})")
