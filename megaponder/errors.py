"""User errors and how the command line reports them.

A :class:`UserError` is a problem with what the user gave megaponder — a config, a data file, a
checkpoint — phrased as what is wrong and what to change. The command line prints it as one
line, ``megaponder: <message>``, on stderr and exits with code 2; the traceback would only bury
the message, so it is shown only with ``megaponder --debug ...`` or ``MEGAPONDER_DEBUG=1``.

Under a multi-process launcher every rank usually hits the same error (they read the same
config and files), so only rank 0 prints it. During training start-up the ranks agree on who
failed (megaponder.collectives): a rank that fails alone prints its own message and rank
0 prints which rank failed and why. Every failing rank also writes its message into torchrun's
error file (``TORCHELASTIC_ERROR_FILE``), which torchrun shows as the root cause in its
``ChildFailedError`` summary — the last block it prints.

Subclass :class:`UserError` (together with the builtin it replaces, e.g. ``ValueError``, so that
existing ``except ValueError`` code keeps working) for any new kind of user-facing error.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
import traceback
from typing import Callable, Optional

#: exit code of a run stopped by a user error (argparse uses the same for bad arguments)
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem in the user's input; the CLI prints the message alone, once."""


class DataError(UserError, ValueError):
    """A dataset (``.bin``/``.idx``, tokenizer, vocabulary) does not fit the run."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (data, tokenizer, input) does not exist."""


class DiskFull(UserError, OSError):
    """A write failed because the file system is full (or the quota is used up)."""


#: errno of a full file system / used-up quota, and how torch.save words a short write (it
#: drops the errno: "PytorchStreamWriter failed writing file ...", "unexpected pos N vs M")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SHORT_WRITE_MARKERS = ("PytorchStreamWriter failed writing", "unexpected pos")
_NEARLY_FULL_BYTES = 16 << 20


def disk_full(err: BaseException, path: str, doing: str) -> Optional[DiskFull]:
    """A :class:`DiskFull` naming ``path`` when ``err`` (raised while ``doing`` something
    under ``path``) is a full file system, else None. A torch.save short write counts when
    the file system under ``path`` has almost no space left (it does not keep the errno)."""
    full = isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS
    if not full and any(m in str(err) for m in _SHORT_WRITE_MARKERS):
        try:
            stat = os.statvfs(path)
            full = stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES
        except OSError:
            full = False
    if not full:
        return None
    return DiskFull(f"disk full at {path}: {doing} failed ({one_line(err)[:120]}); free space "
                    f"there (or lower train.keep_last) and resume with --set train.resume=auto.")


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("MEGAPONDER_DEBUG", "").lower() not in ("", "0", "false", "no")


def launcher_rank() -> int:
    """This process's rank from whichever launcher started it, without touching torch."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def one_line(err: BaseException) -> str:
    """The message as one line: a multi-line message (e.g. a list of config problems) keeps
    its items, joined with ' | '."""
    text = str(err).strip() or type(err).__name__
    parts = [re.sub(r"^- ", "", p.strip()) for p in text.splitlines()]
    parts = [p for p in parts if p]
    if not parts:
        return type(err).__name__
    head, items = parts[0], parts[1:]
    if items and head.endswith(":"):  # "Invalid configuration:" followed by its items
        return f"{head} " + " | ".join(items)
    return " | ".join(parts)


def _write_elastic_error_file(message: str) -> None:
    # torchrun reads this JSON (the layout its @record decorator writes) and prints
    # "py_callstack" as the failure's "traceback" line: our one line instead of a traceback.
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {
        "py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the report on stderr still stands


_REPORT_HERE = "_megaponder_report_here"


def mark_report_here(err: BaseException, here: bool) -> None:
    """Decide whether this rank prints ``err`` (overriding the rank-0 rule): set when the ranks
    know who failed (megaponder.collectives), e.g. rank 1 alone."""
    setattr(err, _REPORT_HERE, bool(here))


def report(err: BaseException, *, debug: bool = False, stream=None) -> int:
    """Print ``err`` the user-error way and return the exit code."""
    stream = stream or sys.stderr
    message = f"megaponder: {one_line(err)}"
    if debug_enabled(debug):
        traceback.print_exception(err, file=stream)
    _write_elastic_error_file(message)
    here = getattr(err, _REPORT_HERE, None)
    if (launcher_rank() == 0 if here is None else here) or debug_enabled(debug):
        stream.write(message + "\n")
        stream.flush()
    return USER_ERROR_EXIT


def run_reporting_user_errors(func: Callable[[], int], *, debug: bool = False) -> int:
    """Run a CLI command; a :class:`UserError` becomes one line on stderr and exit code 2."""
    try:
        return func()
    except UserError as err:
        return report(err, debug=debug)
