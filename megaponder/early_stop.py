"""Stop requests that arrive before the training loop runs.

A batch system sends SIGTERM at a time limit or on preemption whenever it likes, also while
``megaponder train`` is still importing torch, checking the data, building the model or
loading a checkpoint. Python's default action would end the process with code 143, no message
and, under a launcher, often only some of the ranks. :func:`hold` (called by the command line
before the heavy imports) records SIGTERM instead; the trainer asks every rank once its
start-up is over (:func:`megaponder.train.loop.train`) and, if any rank was signalled, all of
them exit 0 with "nothing to save yet". A signal that arrives after that check is taken over by
the loop's own handlers (:class:`megaponder.train.guards.StopRequest`), which save after the
current step. Ctrl-C (SIGINT) during start-up still stops at once: someone at a terminal
wants it to, and nothing is lost.

This module imports nothing heavy on purpose: it must be usable before torch is imported.
"""
from __future__ import annotations

import signal
from typing import Optional

_reason: Optional[str] = None
_previous: dict = {}  # the handlers hold() replaced, for release()


def _record(signum, frame) -> None:
    global _reason
    _reason = signal.Signals(signum).name


def hold() -> None:
    """From now on SIGTERM is recorded, not fatal (until the loop's handlers take over)."""
    global _reason
    _reason = None
    _previous.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, _record))


def release(redeliver: bool = False) -> None:
    """Put back the handlers :func:`hold` replaced (a command run inside a longer process);
    ``redeliver``: then raise the signal held meanwhile, for a command that does not stop
    cleanly (it ends as it would have without :func:`hold`)."""
    while _previous:
        sig, handler = _previous.popitem()
        signal.signal(sig, handler)
    reason = take()
    if redeliver and reason is not None:
        signal.raise_signal(signal.Signals[reason])


def pending() -> Optional[str]:
    """The signal recorded since :func:`hold` (``"SIGTERM"``), or None."""
    return _reason


def take() -> Optional[str]:
    """:func:`pending`, and forget it (the loop's handlers own it from here)."""
    global _reason
    reason, _reason = _reason, None
    return reason
