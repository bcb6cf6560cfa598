"""The supported torch range, checked once at import.

Oldest supported: torch 2.6 (what transformers 5.x and NGC's 2025 images require; the CPU CI
runs the pinned 2.13). Newer APIs the code uses are guarded where they appear:
FlexAttention (2.5+; the ``flex`` backend registers only when it imports),
``torch.compiler.is_compiling`` (looked up with getattr), fused AdamW on CPU (2.4+; opt-in
``optim.fused``). What needs nothing newer than 2.6: ``nn.Module.compile`` (2.2),
``F.scaled_dot_product_attention(scale=...)`` (2.1), ``torch.utils.flop_counter`` (2.1),
``torch.load(weights_only=...)`` (1.13), saved-tensor hooks (1.10).
"""
from __future__ import annotations

import re
import warnings

import torch

TORCH_MIN = (2, 6)


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    """(major, minor) of a torch version string; NGC's ``2.6.0a0+ecf3bae40a`` counts as 2.6
    (pip orders it below 2.6.0, but its APIs are 2.6's)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_torch(version: str = torch.__version__) -> bool:
    """Warn (once, at import) when torch is older than :data:`TORCH_MIN`."""
    if torch_version(version) >= TORCH_MIN:
        return True
    warnings.warn(f"megaponder supports torch >= {TORCH_MIN[0]}.{TORCH_MIN[1]}; this is torch "
                  f"{version}. Upgrade torch (pip install 'torch>=2.6'); older versions are untested.")
    return False
