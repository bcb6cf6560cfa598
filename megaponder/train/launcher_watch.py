"""Stopping cleanly when the deepspeed launcher that started this rank goes away.

DeepSpeed's launcher is two programs. ``deepspeed`` (the runner, deepspeed/launcher/runner.py)
starts ``python -m deepspeed.launcher.launch`` (launch.py) on every node, directly on one
node, through pdsh and ssh on several; launch.py starts the ranks and forwards SIGTERM/SIGINT to
them. A SIGTERM sent to the runner alone (``kill PID``, what a batch script's trap does) does
not reach the ranks:

- one node: the runner installs no signal handler on this path, so it dies and launch.py is
  never told; the ranks train on as orphans;
- several nodes: the runner kills pdsh and runs ``pkill -f`` on every node through a second
  pdsh. When pdsh dies, the ssh sessions that started launch.py close, so their pipes, the
  ranks' stdout and stderr, break, seconds before that pkill arrives: the next log line
  raised BrokenPipeError and rank 0 died without saving.

:class:`LauncherWatch` (used by :class:`~megaponder.train.guards.StopRequest`) notices both:
the process that started launch.py on this node (the runner, or the ssh session on a node it
reached over ssh) is no longer its ancestor. That counts as a stop request, so every rank
finishes its step, saves and exits 0 (launch.py then exits 0 too). :func:`survive_closed_pipes`
makes writes to a pipe whose reader is gone go to /dev/null instead of raising, so that the
save and the exit are not cut short by a log line.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

LAUNCH_MODULE = "deepspeed.launcher.launch"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent_of(pid: int) -> Optional[int]:
    """The parent PID of ``pid`` (None when it is gone or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def _is_runner(args: list[str]) -> bool:
    """``python .../bin/deepspeed ...`` (DeepSpeed's runner script)."""
    return any(os.path.basename(a) == "deepspeed" for a in args[:2])


def _is_ssh_session(args: list[str]) -> bool:
    """sshd's per-connection process (``sshd: root@notty``), on a node reached over ssh."""
    return bool(args) and args[0].startswith("sshd:")


class LauncherWatch:
    """Whether the process that started this node's launch.py, the deepspeed runner or the
    ssh session of the runner's pdsh, still is its ancestor: ``chain`` holds the PIDs from
    launch.py up to it (a shell may sit in between), and the watch fires when any link breaks.
    Nothing above that process is watched: a job started with ``nohup deepspeed ...`` keeps
    training after its shell exits."""

    MAX_LEVELS = 4  # launch.py <- [shell] <- [shell] <- runner or ssh session

    def __init__(self, chain: list[int], starter: str):
        self.chain, self.starter = chain, starter

    @classmethod
    def detect(cls) -> Optional["LauncherWatch"]:
        """A watch when this process is a rank of deepspeed's launch.py, else None (torchrun,
        mpirun, SLURM's srun, a plain process: their launchers forward signals themselves)."""
        chain = [os.getppid()]
        if LAUNCH_MODULE not in _cmdline(chain[0])[:4]:
            return None
        for _ in range(cls.MAX_LEVELS):
            parent = _parent_of(chain[-1])
            if parent is None or parent <= 1:
                return None
            chain.append(parent)
            args = _cmdline(parent)
            if _is_runner(args):
                return cls(chain, f"the deepspeed launcher (pid {parent})")
            if _is_ssh_session(args):
                return cls(chain, f"the ssh session that started {LAUNCH_MODULE} on this node "
                                  f"(pid {parent})")
        return None  # started some other way: nothing known to watch

    def gone(self) -> Optional[str]:
        """Why the job's launcher is gone, or None while it is there (a few /proc reads)."""
        if os.getppid() != self.chain[0]:
            return f"{LAUNCH_MODULE} (pid {self.chain[0]}) exited"
        for child, parent in zip(self.chain, self.chain[1:]):
            if _parent_of(child) != parent:
                return f"{self.starter} exited"
        return None


class _PipeSafeStream:
    """A text stream whose writes, once the pipe's reader is gone (EPIPE), go to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())  # the buffered text then flushes into /dev/null
        finally:
            os.close(null)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_pipes() -> None:
    """Wrap sys.stdout/sys.stderr (once) so a closed ssh session cannot fail a write."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafeStream):
            try:
                stream.fileno()
            except (AttributeError, OSError, ValueError):  # not a real file (e.g. pytest capture)
                continue
            setattr(sys, name, _PipeSafeStream(stream))
