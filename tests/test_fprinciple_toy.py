"""The F-Principle's toy reproductions: the spectral formulas against numpy's FFT, the 1-D
order from small initialisation through the real CLI (CONTRACT's delta_f.json), and the
filtering / projection order on scikit-learn's bundled digits."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

from conftest import REPO_ROOT
from megaponder.analysis.fprinciple_toy import run_digits
from megaponder.analysis.spectral import dft, first_below, nudft, peak_indices, relative_error


def test_nudft_on_a_uniform_grid_is_the_dft_and_peaks_are_the_sines():
    n = 64
    t = torch.arange(n, dtype=torch.float64) / n  # one period: integer k = DFT bin k
    y = torch.sin(2 * math.pi * 2 * t) + 0.5 * torch.cos(2 * math.pi * 7 * t)
    ref = dft(y.numpy())
    got = nudft(y.unsqueeze(1), t, torch.arange(n // 2 + 1, dtype=torch.float64))[:, 0].numpy()
    assert np.allclose(got, ref, atol=1e-12)
    assert peak_indices(ref) == [2, 7]
    assert relative_error(ref, ref, [2, 7]) == [0.0, 0.0]
    assert np.allclose(relative_error(0.5 * ref, ref, [2, 7]), [0.5, 0.5])


def test_1d_small_init_fits_low_frequency_first(tmp_path):
    """sin x + sin 3x + sin 5x from σ = 0.05: Δ_F at k=1 drops below 0.1 well before k=5
    (about 30 vs 1,000 steps when measured; docs/analysis.md)."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    subprocess.run([sys.executable, "-m", "megaponder", "fprinciple", "1d", "--init", "small",
                    "--out", str(tmp_path), "--steps", "1200", "--every", "10"],
                   check=True, env=env, capture_output=True, cwd=REPO_ROOT)
    out = json.load(open(tmp_path / "delta_f.json"))
    assert set(out) == {"peaks", "steps", "delta_f"}
    assert out["peaks"] == [1, 3, 5]
    assert len(out["delta_f"]) == 3 and all(len(row) == len(out["steps"]) for row in out["delta_f"])
    low, high = (first_below(out["steps"], out["delta_f"][i], 0.1) for i in (0, -1))
    assert low is not None and high is not None and low < high, (low, high)
    assert (tmp_path / "fprinciple_1d.png").stat().st_size > 1000


def test_digits_small_init_filtering_and_projection_order(one_thread):
    r = run_digits("small", 160, model="mlp", every=10)
    steps = r["steps"]
    for f in r["filtering"]:
        low, high = first_below(steps, f["e_low"], 0.1), first_below(steps, f["e_high"], 0.1)
        assert low is not None and (high is None or low < high), (f["fraction"], low, high)
    curves = r["projection"]["delta_f"]
    assert len(curves) >= 2
    first, last = first_below(steps, curves[0], 0.1), first_below(steps, curves[-1], 0.1)
    assert first is not None and (last is None or first < last), (first, last)
