"""Writing into run dirs, data dirs and caches without following planted links.

A run dir, a data folder or an index cache may be shared (a group's scratch space, a copied
run). A symlink planted there under a name megaponder writes (``.lock``, ``latest``,
``metrics.jsonl``, a temp name) would otherwise make megaponder truncate or overwrite the file
it points to, anywhere the user can write. Every write therefore goes through this module:

* :func:`open_for_write` opens with ``O_NOFOLLOW``: a link at the final name is refused with
  one line (:class:`UnsafePath`), never followed;
* :func:`atomic_write` / :func:`write_atomic` write a fresh temp file (``O_CREAT | O_EXCL``,
  a random name: nothing planted can be reused) and rename it over the target; a rename
  replaces a link itself, never the file it points to;
* :func:`real_folder` makes or checks a folder *inside* megaponder's own tree (``checkpoints/``,
  a checkpoint tag): it must be a real folder, not a link to somewhere else.

The folder the user names (``train.run_dir``, an ``--output-prefix``'s folder) may itself be a
link (``runs -> /scratch/runs``): that is the user's choice, and only names below it are
checked.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import IO, Iterator, Optional

from .errors import UserError

_FLAGS = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
          "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "r+": os.O_RDWR | os.O_CREAT}


class UnsafePath(UserError, OSError):
    """A name megaponder writes or reads its own files from is a link (or not a regular file
    or folder): someone planted it. The message names it and what to do."""


def _refuse_link(path: str, what: str) -> UnsafePath:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return UnsafePath(f"{path} is a symbolic link (to {target[:120]}); megaponder never writes "
                      f"{what} through a link. Remove the link and run again.")


def open_fd_for_write(path: str, mode: str = "w", perm: int = 0o666) -> int:
    """The file descriptor :func:`open_for_write` wraps (for ``fcntl`` locks and the like)."""
    fd = None
    try:
        fd = os.open(path, _FLAGS[mode.replace("b", "")] | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, perm)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # O_NONBLOCK: a planted FIFO must not hang us
            raise UnsafePath(f"{path} is not a regular file; megaponder writes only regular "
                             f"files there. Remove it and run again.")
        os.set_blocking(fd, True)
        return fd
    except OSError as err:
        if fd is not None:
            os.close(fd)
        if not isinstance(err, UnsafePath) and os.path.islink(path):  # ELOOP (EEXIST with "x")
            raise _refuse_link(path, "a file") from None
        raise


def open_for_write(path: str, mode: str = "w", *, encoding: Optional[str] = "utf-8",
                   perm: int = 0o666) -> IO:
    """``open(path, mode)`` for writing without following a link at ``path``: ``mode`` is
    ``w``, ``a``, ``x`` or ``r+`` (creating in every case), plus ``b`` for bytes. A link, a
    FIFO or a device at ``path`` raises :class:`UnsafePath`."""
    fd = open_fd_for_write(path, mode, perm)
    py_mode = {"w": "w", "a": "a", "x": "w", "r+": "r+"}[mode.replace("b", "")]
    if "b" in mode:
        return os.fdopen(fd, py_mode + "b")
    return os.fdopen(fd, py_mode, encoding=encoding)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, fsync: bool = False,
                 encoding: Optional[str] = "utf-8") -> Iterator[IO]:
    """Write ``path`` all at once: yields a file open on a fresh temp name beside it (created
    exclusively, so a planted link or file under a predictable temp name is never reused); on
    success it is renamed over ``path`` (readers see the old file or the new one, and a link
    at ``path`` is replaced, never followed); on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            f = open_for_write(tmp, "x" + ("b" if "b" in mode else ""), encoding=encoding)
            break
        except FileExistsError:
            continue
        except UnsafePath:  # a link under a random name: another writer's race, try again
            continue
    try:
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(folder)


def write_atomic(path: str, data, *, fsync: bool = False) -> None:
    """:func:`atomic_write` of ``data`` (``str`` as UTF-8 text, or ``bytes``)."""
    with atomic_write(path, "w" if isinstance(data, str) else "wb", fsync=fsync) as f:
        f.write(data)


def fsync_dir(path: str) -> None:
    """Make a rename/create inside ``path`` durable (POSIX: the folder entry is data too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def real_folder(path: str, *, create: bool = False, what: str = "folder") -> str:
    """``path`` as a real folder (not a link, not a file), made with ``create``; a link is
    refused with one line, whatever it points to. Returns ``path``."""
    if create:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_link(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a folder; remove it and run again.")
    return path


@contextlib.contextmanager
def staged_output(output: str) -> Iterator[str]:
    """For libraries that open files by name (transformers' ``save_pretrained``): yields a
    fresh private folder (``mkdtemp``, mode 0700) inside ``output`` to write into; on success
    every file is renamed into ``output`` (a planted link there is replaced, never written
    through). The staging folder is removed in every case."""
    import shutil
    import tempfile

    os.makedirs(output, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".megaponder-staging-", dir=output)
    try:
        yield stage
        for folder, _, files in os.walk(stage):
            rel = os.path.relpath(folder, stage)
            dest = output if rel == "." else real_folder(os.path.join(output, rel), create=True)
            for name in files:
                os.replace(os.path.join(folder, name), os.path.join(dest, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_tree(path: str) -> None:
    """Delete a folder megaponder made, or only the link if ``path`` is one (``shutil.rmtree``
    refuses links, and following one would delete someone else's files)."""
    import shutil

    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)
