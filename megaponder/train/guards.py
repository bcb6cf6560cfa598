"""Training-loop guards: skipping non-finite or spiking updates, and stopping cleanly.

Non-finite / spiking losses
    Before the optimizer step of every training step, each rank sets a flag when its loss (any
    micro-batch) or the gradient norm is NaN/Inf, or when the loss spike rule fires; one
    all-reduce (MAX over every rank) makes the decision common. A skipped step leaves the
    weights and the optimizer state (Adam moments, step count) untouched: the base optimizer
    (:class:`SkippableAdamW`) returns without updating, and DeepSpeed's own overflow check
    skips the same step when the reduced gradients are non-finite. The batch is consumed and
    the learning-rate schedule still advances, so the data order and the schedule remain a
    function of the step number (what makes exact resume possible). After
    ``train.max_skipped_steps`` skipped steps in a row the run stops (:class:`TrainingDiverged`,
    non-zero exit) without saving, so ``checkpoints/latest`` stays on the last good checkpoint.

Preemption
    :class:`StopRequest` turns SIGTERM, SIGINT and ``train.preempt_signal`` into a flag; the
    loop checks it (and ``train.exit_after_minutes``) once per step with one all-reduce, so
    every rank stops after the same step, saves and exits 0.

Fault injection (tests only)
    ``MEGAPONDER_FAULT_NAN="RANK@STEP,..."`` multiplies the loss of global rank RANK at step
    STEP (1-based, as in metrics.jsonl) by NaN, e.g. ``1@3,1@4``.
    ``MEGAPONDER_FAULT_NAN_GRAD`` (same syntax) keeps the loss finite and makes the
    gradients NaN instead (a hook on the loss scales its gradient by NaN): what a backward
    overflow looks like, which only the gradient checks can see. Never set either in a real job.
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

FAULT_NAN_ENV = "MEGAPONDER_FAULT_NAN"
FAULT_NAN_GRAD_ENV = "MEGAPONDER_FAULT_NAN_GRAD"


class TrainingDiverged(RuntimeError):
    """Too many skipped steps in a row; the message says what to change."""


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next ``step()`` can be turned into a no-op (``skip_next = True``).
    ``overflow`` tells DeepSpeed (which reads that attribute of the optimizer it holds) that
    the step was not applied, as for its own fp16 overflow skips."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self.skip_next
        if self.skip_next:
            return None
        return super().step(closure)


def injected_nan_steps(rank: int, env: str = FAULT_NAN_ENV) -> set[int]:
    """Steps at which ``env`` (:data:`FAULT_NAN_ENV` or :data:`FAULT_NAN_GRAD_ENV`) poisons
    this rank's loss or gradients."""
    spec = os.environ.get(env, "").strip()
    steps = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        r, _, s = item.partition("@")
        if not (r.isdigit() and s.isdigit()):
            raise ValueError(f"{env}={spec!r}: expected RANK@STEP[,RANK@STEP...]")
        if int(r) == rank:
            steps.add(int(s))
    return steps


class LossGuard:
    """Per-rank state of the skip decision: the loss spike rule's running mean and the
    counters. Its :meth:`state_dict` goes into the rank's checkpoint state so a resumed run
    makes the same decisions."""

    def __init__(self, spike_factor: float = 0.0, spike_warmup: int = 20, beta: float = 0.98):
        self.spike_factor, self.spike_warmup, self.beta = spike_factor, spike_warmup, beta
        self.ema, self.good_steps = 0.0, 0
        self.skipped_total, self.skipped_in_row = 0, 0

    def running_mean(self) -> float:
        return self.ema / (1 - self.beta ** self.good_steps)  # bias-corrected EMA

    def local_flag(self, losses: list[float], grad_norm: Optional[float]) -> int:
        """1 when this rank wants the step skipped: non-finite loss/norm, or a spike."""
        if not all(math.isfinite(x) for x in losses):
            return 1
        if grad_norm is not None and not math.isfinite(grad_norm):
            return 1
        if self.spike_factor > 0 and self.good_steps >= self.spike_warmup:
            if sum(losses) / len(losses) > self.spike_factor * self.running_mean():
                return 1
        return 0

    def update(self, losses: list[float], skipped: bool) -> None:
        if skipped:
            self.skipped_total += 1
            self.skipped_in_row += 1
            return
        self.skipped_in_row = 0
        self.ema = self.beta * self.ema + (1 - self.beta) * (sum(losses) / len(losses))
        self.good_steps += 1

    def state_dict(self) -> dict:
        return {"ema": self.ema, "good_steps": self.good_steps,
                "skipped_total": self.skipped_total, "skipped_in_row": self.skipped_in_row}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.good_steps = float(state["ema"]), int(state["good_steps"])
        self.skipped_total, self.skipped_in_row = int(state["skipped_total"]), int(state["skipped_in_row"])


def any_rank(flag: int | bool, device=None) -> bool:
    """True when ``flag`` is set on any rank (one all-reduce; no-op without a process group)."""
    return bool(max_over_ranks(int(bool(flag)), device))


def max_over_ranks(value: int, device=None) -> int:
    """The largest ``value`` of all ranks (one all-reduce; no-op without a process group):
    a verdict with several levels in one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    from ..parallel.state import collective_device
    t = torch.tensor([int(value)], dtype=torch.int32, device=device or collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def signal_from_name(name: str) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"`` or ``"10"`` -> the signal; a ValueError says what exists."""
    text = str(name).strip().upper()
    if text.isdigit():
        return signal.Signals(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"train.preempt_signal={name!r} is not a signal name "
                         f"(e.g. SIGTERM, SIGUSR1, SIGUSR2)") from None


class StopRequest:
    """Signal handlers that ask the loop to stop after the current step; restores the old
    handlers on :meth:`close`. A second SIGINT (Ctrl-C twice) stops at once."""

    def __init__(self, extra_signal: Optional[str] = None, exit_after_minutes: float = 0.0):
        self.reason: Optional[str] = None
        self.deadline = time.time() + 60 * exit_after_minutes if exit_after_minutes > 0 else None
        sigs = {signal.SIGTERM, signal.SIGINT}
        if extra_signal:
            sigs.add(signal_from_name(extra_signal))
        self._old = {}
        for sig in sigs:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application)
                pass

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None and self.reason.startswith("SIGINT"):
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def local_reason(self) -> Optional[str]:
        if self.reason is None and self.deadline is not None and time.time() >= self.deadline:
            self.reason = "train.exit_after_minutes"
        return self.reason

    def should_stop(self) -> bool:
        """Collective: every rank gets the same answer after the same step."""
        return any_rank(self.local_reason() is not None)

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def train_config_problems(t) -> list[str]:
    """The run-safety rules of the ``train:`` section, for megaponder.config.validate."""
    problems = []
    if not str(t.run_dir).strip():
        problems.append("train.run_dir is empty; name the run directory (e.g. runs/my-run).")
    if not 0 <= t.seed < 2 ** 32:  # numpy's generators (data order, init) take 32-bit seeds
        problems.append(f"train.seed must be between 0 and 2**32-1 = 4294967295 (got {t.seed}).")
    if t.keep_last < 0:
        problems.append(f"train.keep_last must be >= 0 (got {t.keep_last}; 0 keeps all).")
    if t.max_skipped_steps < 1:
        problems.append(f"train.max_skipped_steps must be >= 1 (got {t.max_skipped_steps}).")
    if t.loss_spike_factor < 0 or 0 < t.loss_spike_factor <= 1:
        problems.append(f"train.loss_spike_factor must be 0 (off) or > 1 (got {t.loss_spike_factor}).")
    if t.exit_after_minutes < 0:
        problems.append(f"train.exit_after_minutes must be >= 0 (got {t.exit_after_minutes}).")
    if t.preempt_signal:
        try:
            sig = signal_from_name(t.preempt_signal)
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                problems.append(f"train.preempt_signal={t.preempt_signal} cannot be caught; "
                                f"use e.g. SIGUSR1.")
        except ValueError as err:
            problems.append(str(err) + ".")
    return problems


def fault_step_sleep() -> None:
    """``MEGAPONDER_FAULT_STEP_SLEEP=SECONDS`` slows every step down, so the signal and kill
    tests can hit a run of a tiny model mid-way. Test-only."""
    delay = os.environ.get("MEGAPONDER_FAULT_STEP_SLEEP")
    if delay:
        time.sleep(float(delay))
