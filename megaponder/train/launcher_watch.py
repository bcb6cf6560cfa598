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
  ranks' stdout and stderr, break: the next ``print`` raises BrokenPipeError, in the middle of
  the save on a rank that got the SIGTERM.

:class:`LauncherWatch` (used by :class:`~megaponder.train.guards.StopRequest`) notices both:
the process that started launch.py on this node (the runner, or the ssh session on a node it
reached over ssh) is no longer launch.py's parent. That counts as a stop request, so every rank
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


def _describe(pid: int) -> str:
    args = _cmdline(pid)
    if any(os.path.basename(a) == "deepspeed" for a in args[:2]):
        return f"the deepspeed launcher (pid {pid})"
    name = os.path.basename(args[0]) if args else "?"
    return f"{name} (pid {pid}), which started {LAUNCH_MODULE} on this node,"


class LauncherWatch:
    """Whether the process that started this rank's launch.py is still its parent."""

    def __init__(self, launch_pid: int, starter_pid: int):
        self.launch_pid, self.starter_pid = launch_pid, starter_pid
        self.starter = _describe(starter_pid)

    @classmethod
    def detect(cls) -> Optional["LauncherWatch"]:
        """A watch when this process is a rank of deepspeed's launch.py, else None (torchrun,
        mpirun, SLURM's srun, a plain process: their launchers forward signals themselves)."""
        launch_pid = os.getppid()
        cmd = _cmdline(launch_pid)
        if LAUNCH_MODULE not in cmd[:4]:
            return None
        starter = _parent_of(launch_pid)
        if starter is None or starter <= 1:  # started by init itself: nothing to watch
            return None
        return cls(launch_pid, starter)

    def gone(self) -> Optional[str]:
        """Why the job's launcher is gone, or None while it is there (two /proc reads)."""
        if os.getppid() != self.launch_pid:
            return f"{LAUNCH_MODULE} (pid {self.launch_pid}) exited"
        if _parent_of(self.launch_pid) != self.starter_pid:
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
