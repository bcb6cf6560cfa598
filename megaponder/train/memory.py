"""Live tensor bytes of a piece of code, with a TorchDispatchMode: what the memory plan
(megaponder/train/plan.py) measures on fake tensors and what its check measures on real ones.

    with LiveBytes() as live:
        loss = model(ids, targets=ids).loss
        loss.backward()
    live.peak   # the largest sum of bytes of the storages created inside and still alive

Every tensor an operator returns inside the block is counted once per storage (views share
it) from its creation until its storage is freed (a weak reference tells). Tensors made before
the block (the parameters) are not counted; the caller adds them. Under FakeTensorMode the
storages are fake and nothing is allocated, which is how ``megaponder plan`` measures the
activations of a billion-parameter model on a laptop. torch's own
``torch.distributed._tools.mem_tracker.MemTracker`` does the same per module but refuses a
module called more than once per step (every pondering pass calls the stack again).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _track(self, tensor: torch.Tensor, inputs: set) -> None:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):   # sparse / nested: not in our models
            return
        key = id(storage)
        if key in self._alive or key in inputs:   # a view or an in-place result: no new bytes
            return
        nbytes = storage.nbytes()
        self._alive[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)

        def freed(_ref, key=key):
            self.current -= self._alive.pop(key, 0)
            self._refs.pop(key, None)
        try:
            self._refs[key] = weakref.ref(storage, freed)
        except TypeError:   # a storage without weak reference support: count it as alive
            pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(_storage(v)) for v in tree_flatten((args, kwargs))[0]
                  if isinstance(v, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value, inputs)
        return out

    def adopt(self, tensors) -> None:
        """Count tensors made before the block (a model's parameters and buffers) as live
        from now on, until their storage is freed (e.g. when DeepSpeed flattens or partitions
        them)."""
        for tensor in tensors:
            self._track(tensor, set())

    def reset_peak(self) -> None:
        self.peak = self.current


def _storage(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None
