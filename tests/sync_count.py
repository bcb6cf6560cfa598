"""Count host <- device reads ("syncs") made by torch calls, with a TorchFunctionMode.

    with SyncCounter() as syncs:
        engine.train_step(batch)
    assert syncs.count <= 2, syncs.report()

Every call of a tensor -> host read (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``.cpu()``, ``.numpy()``, ``nonzero``) is one sync on a GPU: the host waits for
the device queue to drain. On CPU nothing waits, but the calls are the same code path, so
counting them on CPU predicts the GPU's stalls. Calls made from ``torch/optim/`` are not
counted: torch's optimizers keep their step counters on the host on GPUs too (their
``_get_value``/``_get_scalar_dtype`` reads are of CPU scalars). The mode sees every call that
goes through ``torch.overrides`` (Python-level tensor methods and functions), including the
ones DeepSpeed makes; ``by_origin()`` splits the count into megaponder's and DeepSpeed's.
``host_randint`` (megaponder/models/latent.py) is left out too: it reads a draw of a CPU
generator, a tensor that never was on a device.
"""
from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

#: the names of torch calls that read a tensor's value on the host
SYNC_NAMES = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                        "cpu", "numpy", "nonzero"})
_OPTIM_DIR = os.path.join("torch", "optim") + os.sep
#: functions that read tensors made on the host from a CPU generator (no device involved)
HOST_ONLY_FUNCTIONS = frozenset({"host_randint"})


def _name(func) -> str:
    return getattr(func, "__name__", "") or ""


class SyncCounter(TorchFunctionMode):
    """Counts sync calls; ``sites`` maps "file:line (name)" of the first caller outside torch
    to how often it synced (for a readable failure message)."""

    def __init__(self, keep_sites: bool = True):
        super().__init__()
        self.count = 0
        self.keep_sites = keep_sites
        self.sites: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        if name in SYNC_NAMES and _reads_a_tensor(name, args):
            stack = traceback.extract_stack(limit=40)[:-1]
            if not any(_OPTIM_DIR in f.filename or f.name in HOST_ONLY_FUNCTIONS for f in stack):
                self.count += 1
                if self.keep_sites:
                    self.sites[_caller(stack) + f" ({name})"] += 1
        return func(*args, **(kwargs or {}))

    def by_origin(self) -> dict:
        """{"deepspeed": n, "megaponder": n}: which code asked for the reads."""
        out = {"deepspeed": 0, "megaponder": 0}
        for site, n in self.sites.items():
            out["deepspeed" if site.startswith("deepspeed") else "megaponder"] += n
        return out

    def report(self) -> str:
        return f"{self.count} syncs: " + "; ".join(f"{s} x{n}" for s, n in self.sites.most_common())


def _reads_a_tensor(name: str, args) -> bool:
    # .cpu() of a tensor already on the CPU copies nothing on a GPU machine either when the
    # tensor was made on the host; but a CPU-only test cannot tell the two apart, so it counts
    return bool(args) and isinstance(args[0], torch.Tensor)


def _caller(stack) -> str:
    """The innermost frame outside torch itself (the code that asked for the value)."""
    sep = os.sep
    for frame in reversed(stack):
        f = frame.filename
        if f"{sep}torch{sep}" in f or f.endswith("sync_count.py"):
            continue
        short = f.split(f"site-packages{sep}")[-1].split(f"megaponder{sep}", 1)[-1]
        return f"{short}:{frame.lineno}"
    return "?"
