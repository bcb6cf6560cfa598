"""``model.compile``: regional torch.compile of the transformer layers.

Only the layers are compiled, each in place (``nn.Module.compile``), not the whole model: the
pondering recurrence, the halting decisions, AdaPonderLM's KV-reuse hook and the decoder's
compaction stay eager Python around them, so data-dependent control flow never reaches
Dynamo, every layer shares one compiled graph per call signature (with / without a kv_hook,
training / eval), and parameter names and checkpoints are unchanged (no ``_orig_mod``).
Shapes that vary (compacted decoding) are marked dynamic by Dynamo after the first
recompilation.
"""
from __future__ import annotations

import torch.nn as nn


def compile_layers(model: nn.Module, backend: str = "inductor", **kwargs) -> int:
    """Compile every backbone layer of ``model`` in place; returns how many were compiled.
    ``backend``/``kwargs`` go to torch.compile (the CPU test uses ``aot_eager``: Dynamo
    tracing and AOT autograd of the block without Inductor's C++ build)."""
    from .backbones import BACKBONES

    layer_classes = tuple(spec.layer_cls for spec in BACKBONES.values())
    # a parallel wrapper around a layer (activation checkpointing) is compiled with the
    # layer inside it; the layer itself is then not a child in model.modules()
    layers = [m for m in model.modules()
              if isinstance(m, layer_classes) or isinstance(getattr(m, "inner", None), layer_classes)]
    for layer in layers:
        layer.compile(backend=backend, **kwargs)
    return len(layers)
