"""One trainer per run directory, and no silent reuse of a used one.

The lock is ``fcntl.flock`` on ``<run_dir>/.lock``: the kernel drops it when the holder
exits, however it exits (SIGKILL, node reboot of a local disk), so it is never stale; the file
records who holds it, for the error message. On network file systems without working flock
(some NFS set-ups) the lock may not exclude a second node: keep run dirs on a file system with
POSIX locks, or start one trainer per run dir by other means.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from typing import Optional

from ..config import ConfigError
from ..safe_files import open_fd_for_write, real_folder, remove_tree

LOCK_FILE = ".lock"


class RunDirBusy(ConfigError):
    """Another trainer holds the run directory."""


class RunDirLock:
    """Held by the rank-0 process of a training job for its whole life."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        # never through a link: a planted `.lock -> victim` would be truncated below
        # (a link is refused in one line, megaponder/safe_files.py)
        fd = open_fd_for_write(self.path, "r+", perm=0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(f"run dir {os.path.dirname(self.path)} is in use by {holder}; "
                             f"two trainers would mix their checkpoints. Wait for it to finish, "
                             f"stop it, or choose another train.run_dir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def prepare_fresh_start(run_dir: str, overwrite: bool) -> Optional[str]:
    """A start from step 0 on ``run_dir``: refuse when it holds an earlier run's checkpoints or
    metrics unless ``overwrite`` (then clear them, so ``latest`` cannot name the old run).
    Returns a warning to print, or None."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    used = [p for p in (metrics,) if os.path.lexists(p)]
    if os.path.lexists(ckpt_root) and (os.path.islink(ckpt_root) or os.listdir(ckpt_root)):
        used.append(ckpt_root)
    if not used:
        return None
    if not overwrite:
        raise ConfigError(f"train.run_dir={run_dir} already holds a run ({', '.join(used)}). "
                          f"Continue it with --set train.resume=auto, start over with "
                          f"--set train.overwrite=true, or choose another train.run_dir.")
    for path in used:
        remove_tree(path)  # a link goes, never what it points to
    return f"train.overwrite=true: removed the earlier run's {', '.join(used)}"


def claim_run_dir(run_dir: str, ckpt_root: str, resume, overwrite: bool):
    """Rank 0 at the start of a job: take the lock, repair an interrupted save, decide
    whether this job resumes (``resume`` is True, False or "auto") and refuse a fresh start on
    a used run dir. Returns ``(lock, resumes, notes)``; raises ConfigError/CheckpointError."""
    from . import checkpoint as ckpt

    lock = RunDirLock(run_dir)
    lock.acquire()
    try:
        notes = ckpt.recover(ckpt_root)
        latest = ckpt.latest_tag(ckpt_root, must_exist=False)  # refuses a latest out of the run
        has_checkpoint = latest is not None or bool(ckpt.complete_tags(ckpt_root))
        if resume is True and not has_checkpoint:
            raise ConfigError(f"train.resume=true but {ckpt_root} holds no complete checkpoint; "
                              f"use train.resume=auto to start from step 0 when there is none.")
        resumes = has_checkpoint and resume in (True, "auto")
        if not resumes:
            if resume == "auto":  # killed before its first checkpoint: nothing to keep
                overwrite = True
            note = prepare_fresh_start(run_dir, overwrite)
            if note:
                notes.append(note)
            wandb_id = os.path.join(run_dir, "wandb_id")
            if os.path.exists(wandb_id):
                os.remove(wandb_id)  # a new run is a new W&B run
            real_folder(ckpt_root, create=True, what="checkpoints")
        return lock, resumes, notes
    except BaseException:
        lock.release()
        raise
