"""The Frequency Principle reproduced on small problems: 1-D regression and 8×8 digits.

``run_1d`` — a sum of sines on a uniform grid fitted by a tanh MLP (Xu-group reference code:
target sin x + sin 3x + sin 5x on [−π, π], full-batch Adam, MSE); Δ_F at the DFT peaks of
the target over training (``megaponder fprinciple 1d``).

``run_digits`` — scikit-learn's bundled 8×8 digits (1,797 images, no download), one-hot
targets and softmax outputs of a small MLP or CNN trained with full-batch Adam and
cross-entropy; the filtering method (e_low / e_high per δ) and the projection method (Δ_F at
the peaks of the non-uniform DFT along the first principal component) over training
(``megaponder fprinciple digits``).

Initialisation. Every weight and bias is drawn from N(0, σ²) with one absolute σ, as in the
Xu-group 1-D code (σ = 0.05): ``small`` is σ = 0.05, ``large`` is σ = 1.0 (for a width-200
tanh layer that saturates the units: the regime 1808.04295 calls large initialisation).
Everything is seeded; both inits use the same data and optimiser.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .spectral import (dft, first_principal_component, gaussian_kernels, median_squared_distance, nudft,
                       peak_indices, relative_error, squared_distances)

INIT_STD = {"small": 0.05, "large": 1.0}

__all__ = ["INIT_STD", "init_std", "mlp", "DigitsCNN", "run_1d", "run_digits"]


def init_std(init) -> float:
    """``small`` / ``large`` or a number (σ of every weight and bias)."""
    if isinstance(init, str) and init in INIT_STD:
        return INIT_STD[init]
    try:
        return float(init)
    except (TypeError, ValueError):
        raise ValueError(f"init must be one of {sorted(INIT_STD)} or a positive number, got {init!r}") from None


def _normal_init(module: nn.Module, std: float) -> None:
    for p in module.parameters():
        nn.init.normal_(p, std=std)


def mlp(dims: Sequence[int], activation: str, std: float) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(act())
    net = nn.Sequential(*layers)
    _normal_init(net, std)
    return net


class DigitsCNN(nn.Module):
    """The Xu-group CIFAR CNN shrunk to 8×8 inputs: Conv(16,3×3)-Conv(32,3×3)-MaxPool2-FC128-FC10, ReLU."""

    def __init__(self, std: float):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 128), nn.Linear(128, 10)
        _normal_init(self, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x.view(-1, 1, 8, 8)))))
        h = F.max_pool2d(h, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def _record_steps(steps: int, every: int) -> list[int]:
    return sorted(set(range(0, steps + 1, max(1, every))) | {steps})


def run_1d(init="small", steps: int = 1000, *, frequencies: Sequence[float] = (1, 3, 5),
           n: int = 201, width: Sequence[int] = (200, 200, 100), activation: str = "tanh",
           lr: float = 1e-3, every: int = 10, seed: int = 0, fit_steps: Optional[Sequence[int]] = None) -> dict:
    """Fit y = Σ_f sin(f x) on n points of [−π, π) (endpoint excluded, so sin(f x) with
    integer f sits exactly on DFT bin f) and track Δ_F at the target's spectral peaks.

    Returns the CONTRACT's ``peaks`` (DFT indices, low to high), ``steps`` and ``delta_f``
    (one row per peak, one column per recorded step), plus what the plots need: the target
    and final output spectra, the training loss, and the fit on a 4× finer grid at a few
    steps (``fits``), which shows the interpolation between training points."""
    std = init_std(init)
    torch.manual_seed(seed)
    grid = torch.linspace(-math.pi, math.pi, n + 1, dtype=torch.float64)[:-1]
    fine = torch.linspace(-math.pi, math.pi, 4 * n + 1, dtype=torch.float64)[:-1]
    target = lambda t: sum(torch.sin(f * t) for f in frequencies)  # noqa: E731
    x, y = grid.float().unsqueeze(1), target(grid).float()
    net = mlp((1, *width, 1), activation, std)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    y_hat = dft(y.numpy())
    peaks = peak_indices(y_hat)
    record = _record_steps(steps, every)
    fit_steps = sorted(set(fit_steps or [record[len(record) // 10], record[len(record) // 3], steps]))
    delta_f, losses, fits = [], [], {}
    start = time.time()
    for step in range(steps + 1):
        if step in record or step in fit_steps:
            with torch.no_grad():
                h = net(x).squeeze(1)
                if step in record:
                    delta_f.append(relative_error(dft(h.numpy()), y_hat, peaks))
                    losses.append(float(F.mse_loss(h, y)))
                if step in fit_steps:
                    fits[step] = net(fine.float().unsqueeze(1)).squeeze(1).tolist()
        if step == steps:
            break
        loss = F.mse_loss(net(x).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        h_final = net(x).squeeze(1).numpy()
        test_mse = float(F.mse_loss(net(fine.float().unsqueeze(1)).squeeze(1), target(fine).float()))
    return {
        "experiment": "1d", "init": init, "init_std": std, "frequencies": list(frequencies),
        "activation": activation, "width": list(width), "lr": lr, "n": n, "seed": seed,
        "peaks": peaks, "steps": record, "delta_f": [list(col) for col in zip(*delta_f)],
        "loss": losses, "test_mse_fine_grid": test_mse,
        "target_amplitude": np.abs(y_hat).tolist(), "output_amplitude": np.abs(dft(h_final)).tolist(),
        "x": grid.tolist(), "y": y.tolist(), "x_fine": fine.tolist(),
        "fits": {str(k): v for k, v in fits.items()}, "wall_s": round(time.time() - start, 2),
    }


def load_digits_tensors(n: Optional[int] = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled digits as (x [N, 64] in [0, 1], labels [N]); a seeded subset of n."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(d.target, dtype=torch.int64)
    if n is not None and n < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x, labels = x[idx], labels[idx]
    return x, labels


def run_digits(init="small", steps: int = 300, *, model: str = "mlp", n: Optional[int] = None,
               delta_fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.5), num_freqs: int = 200,
               max_freq: float = 4.0, lr: float = 1e-3, every: int = 10, seed: int = 0) -> dict:
    """Filtering and projection methods on the digits over full-batch training.

    δ grid: fractions of the median squared distance between training images (9.4 on the
    full set in [0, 1] pixel units), because the scale of the input cloud sets what "low
    frequency" means. Projection: t_i = p·(x_i − mean) along the first principal component,
    frequencies k ∈ [0, max_freq] (cycles per unit of t; t spans about ±2), ``num_freqs``
    points; the peaks of ‖ŷ_p(k)‖ (norm over the 10 classes) are the tracked frequencies."""
    std = init_std(init)
    x, labels = load_digits_tensors(n, seed)
    y = F.one_hot(labels, 10).double()
    sq = squared_distances(x)
    median = median_squared_distance(sq)
    deltas = [f * median for f in delta_fractions]
    kernel_by_delta = gaussian_kernels(sq, deltas)
    p = first_principal_component(x)
    t = (x.double() - x.double().mean(0)) @ p
    freqs = torch.linspace(0.0, max_freq, num_freqs, dtype=torch.float64)
    y_hat = nudft(y, t, freqs)
    y_amp = y_hat.abs().pow(2).sum(1).sqrt().numpy()
    peaks = peak_indices(y_amp)
    y_hat_np = y_hat.numpy()

    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    torch.manual_seed(seed)
    net = mlp((64, 200, 200, 10), "relu", std) if model == "mlp" else DigitsCNN(std)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    record = _record_steps(steps, every)
    filtering = {d: {"e_low": [], "e_high": []} for d in deltas}
    projection, losses, accuracy = [], [], []
    low_y = {d: k @ y for d, k in kernel_by_delta.items()}
    start = time.time()
    for step in range(steps + 1):
        if step in record:
            with torch.no_grad():
                logits = net(x)
                h = torch.softmax(logits.double(), -1)
                diff = y - h
                for d, k in kernel_by_delta.items():
                    low = k @ diff
                    filtering[d]["e_low"].append(float(low.norm() / low_y[d].norm()))
                    filtering[d]["e_high"].append(float((diff - low).norm() / (y - low_y[d]).norm()))
                projection.append(relative_error(nudft(h, t, freqs).numpy(), y_hat_np, peaks))
                losses.append(float(F.cross_entropy(logits, labels)))
                accuracy.append(float((logits.argmax(-1) == labels).double().mean()))
        if step == steps:
            break
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {
        "experiment": "digits", "init": init, "init_std": std, "model": model, "n": len(x),
        "lr": lr, "seed": seed, "steps": record, "loss": losses, "train_accuracy": accuracy,
        "median_sq_distance": median, "delta_fractions": list(delta_fractions),
        "filtering": [{"delta": d, "fraction": f, **filtering[d]} for d, f in zip(deltas, delta_fractions)],
        "projection": {"freqs": freqs.tolist(), "target_amplitude": y_amp.tolist(), "peaks": peaks,
                       "peak_freqs": [float(freqs[k]) for k in peaks],
                       "delta_f": [list(col) for col in zip(*projection)]},
        "wall_s": round(time.time() - start, 2),
    }
