"""The Frequency Principle's three measurements as plain functions (no training, no plots).

Xu et al. (arXiv 1807.01251, 1901.06523) measure *which frequencies of the target a network
has fitted* in three ways; each function here is one formula of those papers:

* **1-D relative error at spectral peaks.** ``dft`` of target y and output h on a uniform
  grid; ``peak_indices`` = local maxima of |ŷ_k| (a point larger than both neighbours, the
  papers' ``SelectPeakIndex``: away from the peaks a small |ŷ_k| is spectral leakage and its
  relative error is meaningless); ``relative_error`` Δ_F(k) = |ĥ_k − ŷ_k| / |ŷ_k|.
* **Projection method** (high-dimensional inputs): ``nudft`` along a unit direction p,
  ŷ_p(k) = (1/n) Σ_i y_i exp(−i 2π k p·x_i), then Δ_F at the peaks of |ŷ_p(k)|. For vector
  outputs (C classes) the modulus is the Euclidean norm over the C complex components, so all
  classes count; the papers analyse one component (our choice, not theirs).
* **Filtering method**: Gaussian smoothing in input space, ``gaussian_kernels`` K_δ with
  G(x) = exp(−|x|²/(2δ)), row-normalised; y_low = K y, y_high = y − y_low (same for h);
  e_low = ‖K(y − h)‖ / ‖K y‖, e_high = ‖(I − K)(y − h)‖ / ‖(I − K) y‖ (``filtered_errors``).

Two properties follow from the row normalisation and are tested
(tests/test_fprinciple_lm.py): a predictor that ignores x (the same h for every input) has
(I − K)h = 0, so its e_high is exactly 1; a predictor equal to the target has both errors 0.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["dft", "peak_indices", "relative_error", "nudft", "first_principal_component",
           "squared_distances", "median_squared_distance", "gaussian_kernels", "filter_forms",
           "filtered_errors", "filtered_errors_gram", "first_below"]


def dft(values: np.ndarray) -> np.ndarray:
    """DFT coefficients 0..n/2 of samples on a uniform grid ([n] or [n, C] -> [n//2+1, ...]),
    divided by n so that amplitudes do not depend on the grid size."""
    values = np.asarray(values, dtype=np.float64)
    return np.fft.rfft(values, axis=0) / len(values)


def _modulus(coeffs: np.ndarray) -> np.ndarray:
    """|c| for scalar outputs, the Euclidean norm over components for vector outputs."""
    coeffs = np.asarray(coeffs)
    return np.abs(coeffs) if coeffs.ndim == 1 else np.sqrt((np.abs(coeffs) ** 2).sum(axis=1))


def peak_indices(amplitude: np.ndarray, min_relative: float = 1e-3) -> list[int]:
    """Local maxima of a spectrum (strictly larger than both neighbours; index 0 and the last
    index have one neighbour and are never peaks). ``min_relative`` drops numerical ripples
    below that fraction of the largest peak (exact-bin sines leave 1e-16 "peaks")."""
    a = _modulus(amplitude) if np.iscomplexobj(amplitude) else np.asarray(amplitude, dtype=np.float64)
    idx = [k for k in range(1, len(a) - 1) if a[k] > a[k - 1] and a[k] > a[k + 1]]
    if not idx:
        return []
    top = max(a[k] for k in idx)
    return [k for k in idx if a[k] >= min_relative * top]


def relative_error(h_hat: np.ndarray, y_hat: np.ndarray, peaks: Sequence[int]) -> list[float]:
    """Δ_F(k) = |ĥ_k − ŷ_k| / |ŷ_k| at each peak (norm over components for vector outputs)."""
    diff = _modulus(np.asarray(h_hat)[list(peaks)] - np.asarray(y_hat)[list(peaks)])
    return list(map(float, diff / _modulus(np.asarray(y_hat)[list(peaks)])))


def nudft(values: torch.Tensor, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Non-uniform DFT (1/n) Σ_i v_i exp(−i 2π k t_i) for every k in ``freqs``:
    values [n, C], t [n] (the projections p·x_i) -> [K, C] complex128."""
    phase = torch.exp(-2j * np.pi * freqs.double().unsqueeze(1) * t.double().unsqueeze(0))
    return phase @ values.to(torch.complex128) / values.shape[0]


def first_principal_component(x: torch.Tensor) -> torch.Tensor:
    """The unit direction of largest variance of the rows of x (sign fixed: largest |entry| > 0)."""
    centred = x.double() - x.double().mean(0)
    p = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return p * torch.sign(p[p.abs().argmax()])


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """|x_i − x_j|² for all pairs (float64; computed once, reused for every δ)."""
    x = x.double()
    n2 = (x * x).sum(1)
    return (n2.unsqueeze(1) + n2.unsqueeze(0) - 2.0 * x @ x.T).clamp_min(0.0).fill_diagonal_(0.0)


def median_squared_distance(sq: torch.Tensor) -> float:
    off = ~torch.eye(len(sq), dtype=torch.bool)
    return float(sq[off].median())


def gaussian_kernels(sq: torch.Tensor, deltas: Iterable[float]) -> dict[float, torch.Tensor]:
    """Row-normalised K_δ[i, j] = G(x_i − x_j) / Σ_j G(x_i − x_j) from squared distances.
    The diagonal term is exp(0) = 1, so no row sum vanishes however small δ is."""
    result = {}
    for delta in deltas:
        g = torch.exp(-sq / (2.0 * float(delta)))
        result[float(delta)] = g / g.sum(dim=1, keepdim=True)
    return result


def filter_forms(kernel_by_delta: dict[float, torch.Tensor]) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Per δ the quadratic forms (KᵀK, (I − K)ᵀ(I − K)): ‖K M‖_F² = ⟨KᵀK, M Mᵀ⟩ and
    ‖(I − K) M‖_F² = ⟨(I − K)ᵀ(I − K), M Mᵀ⟩, so a vocabulary-wide M (N × |V|) enters only
    through its N × N Gram matrix, and each error then costs 2 N² (build the forms once)."""
    forms = {}
    for delta, k in kernel_by_delta.items():
        high = torch.eye(len(k), dtype=k.dtype) - k
        forms[float(delta)] = (k.T @ k, high.T @ high)
    return forms


def _filtered_ratio(form: torch.Tensor, d_gram: torch.Tensor, y_gram: torch.Tensor) -> float:
    # the clamp: a form is positive semi-definite, but rounding can push ⟨form, D Dᵀ⟩ below 0
    return (max(float((form * d_gram).sum()), 0.0) / max(float((form * y_gram).sum()), 1e-300)) ** 0.5


def filtered_errors_gram(y_gram: torch.Tensor, d_gram: torch.Tensor,
                         forms: dict[float, tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """e_low / e_high per δ from Y Yᵀ, D Dᵀ (D = Y − H) and the forms of :func:`filter_forms`."""
    return [{"delta": delta, "e_low": _filtered_ratio(low, d_gram, y_gram),
             "e_high": _filtered_ratio(high, d_gram, y_gram)} for delta, (low, high) in forms.items()]


def filtered_errors(y: torch.Tensor, h: torch.Tensor, kernel_by_delta: dict[float, torch.Tensor]) -> list[dict]:
    """e_low / e_high per δ for dense targets y and outputs h ([N, C], any C)."""
    y, h = y.double(), h.double()
    d = y - h
    return filtered_errors_gram(y @ y.T, d @ d.T, filter_forms(kernel_by_delta))


def first_below(steps: Sequence[int], errors: Sequence[float], threshold: float):
    """The first step at which an error curve is below ``threshold`` (None if never)."""
    for step, err in zip(steps, errors):
        if err < threshold:
            return step
    return None
