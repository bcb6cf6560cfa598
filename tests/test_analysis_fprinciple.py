"""F-Principle filtering diagnostic: the Gram-matrix shortcut against the direct formulas of
papers.md §5.2(c), and the two limits that give the method its meaning."""
import numpy as np
import torch

from megaponder.analysis.fprinciple import filtered_errors, kernels, sample_probes


def _direct(targets, probs, k):
    """The paper's definition, computed literally with dense one-hot matrices."""
    y = torch.nn.functional.one_hot(targets, probs.shape[1]).double()
    y_low, h_low = k @ y, k @ probs
    y_high, h_high = y - y_low, probs - h_low
    return ((y_low - h_low).norm() / y_low.norm()).item(), ((y_high - h_high).norm() / y_high.norm()).item()


def _setup(n=40, v=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    probs = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    return x, targets, probs


def test_gram_shortcut_equals_direct_formula():
    x, targets, probs = _setup()
    ks = kernels(x, [0.3, 1.0, 5.0])
    for row in filtered_errors(targets, probs.clone(), ks):
        e_low, e_high = _direct(targets, probs, ks[row["delta"]])
        assert abs(row["e_low"] - e_low) < 1e-10 and abs(row["e_high"] - e_high) < 1e-10


def test_perfect_prediction_has_zero_error():
    x, targets, _ = _setup()
    perfect = torch.nn.functional.one_hot(targets, 7).double()
    for row in filtered_errors(targets, perfect, kernels(x, [0.5, 2.0])):
        assert row["e_low"] < 1e-7 and row["e_high"] < 1e-7


def test_a_smooth_predictor_fits_low_frequencies_only():
    """h = the smoothed target itself: its low-frequency error is small, its high-frequency
    error large — the signature the F-Principle predicts early in training."""
    x, targets, _ = _setup(n=200, d=2)
    k = kernels(x, [0.5])[0.5]
    smooth = k @ torch.nn.functional.one_hot(targets, 7).double()
    (row,) = filtered_errors(targets, smooth, {0.5: k})
    assert row["e_low"] < 0.6 * row["e_high"], row


def test_probes_are_inside_windows_with_enough_context():
    stream = np.arange(1000) % 97
    probes = sample_probes(stream, seq_length=32, num_samples=50, context=3, seed=1)
    assert len(probes.targets) == 50
    assert bool((probes.cols >= 3).all()) and bool((probes.cols < 32).all())
    # the target is the token after the probe position in the original stream
    assert torch.equal(probes.targets, (probes.windows[probes.rows, probes.cols] + 1) % 97)
