"""Peak dense matmul throughput and memory of common accelerators, for MFU and the memory plan.

MFU (megaponder/train/throughput.py) divides the model's FLOP rate by the device's peak at the
training precision: ``train.peak_tflops`` when set, else this table by the CUDA device name.
``megaponder plan --device NAME`` takes the memory from it.

The figures are the vendors' datasheet numbers for *dense* math (without 2:4 sparsity, which
the datasheets often quote twice as high), at bf16 and at TF32 (what fp32 matmuls run as on
these cards with TF32 enabled; plain-fp32 peaks are lower):

* NVIDIA H100 SXM5 80 GB: bf16 989.4, TF32 494.7 TFLOP/s (H100 Tensor Core GPU datasheet,
  "BF16 Tensor Core 1,979 teraFLOPS*" and "TF32 989 teraFLOPS*", * with sparsity).
* NVIDIA H100 PCIe 80 GB: bf16 756.5, TF32 378 (same datasheet, PCIe column: 1,513* / 756*).
* NVIDIA H100 NVL 94 GB: bf16 835.5, TF32 417.5 (same datasheet, NVL column: 1,671* / 835*).
* NVIDIA H200 SXM 141 GB: bf16 989.4, TF32 494.7 (H200 datasheet: the H100 SXM's Tensor Cores,
  more and faster memory).
* NVIDIA A100 80 GB / 40 GB (SXM and PCIe): bf16 312, TF32 156 (A100 datasheet: "BF16 Tensor
  Core 312 TFLOPS | 624 TFLOPS*", "TF32 156 | 312*").
* NVIDIA L40S 48 GB: bf16 362.05, TF32 183 (L40S datasheet: "BF16 Tensor Core 362.05 | 733*",
  "TF32 183 | 366*").
* AMD Instinct MI300X 192 GB: bf16 1307.4, TF32 653.7 (MI300X datasheet: "Peak bfloat16
  1307.4 TFLOPs" dense, "Peak TF32 653.7 TFLOPs").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Accelerator:
    name: str
    #: lower-case substrings that must all occur in ``torch.cuda.get_device_name()``
    match: tuple
    memory_gb: float      # GB of 10**9 bytes, as the datasheets count
    bf16_tflops: float    # dense
    tf32_tflops: float    # dense

    def peak_tflops(self, precision: str) -> float:
        return self.bf16_tflops if precision == "bf16" else self.tf32_tflops


# the more specific entries first: the first match wins
ACCELERATORS = (
    Accelerator("H100 NVL", ("h100", "nvl"), 94, 835.5, 417.5),
    Accelerator("H100 PCIe", ("h100", "pcie"), 80, 756.5, 378.0),
    Accelerator("H100 SXM", ("h100",), 80, 989.4, 494.7),
    Accelerator("H200", ("h200",), 141, 989.4, 494.7),
    Accelerator("A100 40GB", ("a100", "40gb"), 40, 312.0, 156.0),
    Accelerator("A100", ("a100",), 80, 312.0, 156.0),
    Accelerator("L40S", ("l40s",), 48, 362.05, 183.0),
    Accelerator("MI300X", ("mi300x",), 192, 1307.4, 653.7),
)


def find_accelerator(device_name: str) -> Optional[Accelerator]:
    """The table entry whose substrings all occur in ``device_name`` (case-insensitive), e.g.
    ``"NVIDIA H100 80GB HBM3"`` -> H100 SXM, ``"AMD Instinct MI300X"`` -> MI300X."""
    name = device_name.lower()
    for acc in ACCELERATORS:
        if all(part in name for part in acc.match):
            return acc
    return None


def device_peak_tflops(device, precision: str, override: Optional[float] = None) -> Optional[float]:
    """``override`` (train.peak_tflops) if set; else the table's figure for this CUDA device;
    None on CPU or for a device not in the table (then no MFU is logged)."""
    if override:
        return float(override)
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    acc = find_accelerator(torch.cuda.get_device_name(device))
    return acc.peak_tflops(precision) if acc is not None else None
