"""Frequency-Principle diagnostics for language models (filtering method).

Xu et al. (arXiv 1807.01251, 1901.06523) show that networks trained from small
initialisation fit the low-frequency part of the target first. The *filtering method*
splits the target y and the network output h into a low-frequency part (Gaussian smoothing
in input space) and the high-frequency rest, and tracks the relative error of each over
training (shared/docs/papers.md §5.2(c)):

    y_low_i  = sum_j G(x_i - x_j) y_j / sum_j G(x_i - x_j),   G(x) = exp(-|x|^2 / (2 delta))
    y_high   = y - y_low                      (same for h)
    e_low    = ||y_low - h_low|| / ||y_low||,  e_high = ||y_high - h_high|| / ||y_high||

For next-token prediction (the recipe of §5.5): x_i is the concatenation of the input
embeddings of the ``context`` tokens before position i (from one fixed *reference* table, so
x does not move while the model trains), y_i the one-hot next token, h_i the model's
predicted distribution at i (with its full context).

The vocabulary makes y and h wide (N x |V|). With K the row-normalised kernel and D = y - h,
||K D||_F^2 = trace(K^T K D D^T), so one N x N Gram matrix D D^T per checkpoint serves every
delta; y y^T is just "same next token". Cost: one N x N x |V| product per checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch


@dataclass
class ProbeSet:
    """Fixed positions to probe: windows of tokens and where in each window to look."""

    windows: torch.Tensor  # [W, L] token ids (inputs), read left to right
    rows: torch.Tensor  # [N] window index of each probe
    cols: torch.Tensor  # [N] position in the window (>= context)
    targets: torch.Tensor  # [N] next token at (row, col)


def sample_probes(stream: np.ndarray, seq_length: int, num_samples: int, context: int,
                  seed: int = 0) -> ProbeSet:
    """``num_samples`` probe positions from non-overlapping windows of a token stream."""
    n_windows = (len(stream) - 1) // seq_length
    if n_windows == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one window of {seq_length + 1}")
    rng = np.random.default_rng(seed)
    per_window = max(1, -(-num_samples // n_windows))
    rows, cols = [], []
    for w in rng.permutation(n_windows):
        picks = rng.choice(np.arange(context, seq_length), size=min(per_window, seq_length - context),
                           replace=False)
        rows += [w] * len(picks)
        cols += list(picks)
        if len(rows) >= num_samples:
            break
    rows, cols = np.array(rows[:num_samples]), np.array(cols[:num_samples])
    used = np.unique(rows)
    remap = {w: i for i, w in enumerate(used)}
    windows = np.stack([stream[w * seq_length: w * seq_length + seq_length + 1] for w in used])
    windows = torch.from_numpy(windows.astype(np.int64))
    r = torch.tensor([remap[w] for w in rows])
    c = torch.from_numpy(cols.astype(np.int64))
    return ProbeSet(windows=windows[:, :-1], rows=r, cols=c, targets=windows[r, c + 1])


def probe_inputs(probes: ProbeSet, embedding: torch.Tensor, context: int) -> torch.Tensor:
    """x_i: the reference embeddings of the ``context`` tokens ending at the probe position,
    concatenated and standardised per dimension (so no single direction dominates |x|)."""
    offsets = torch.arange(-context + 1, 1)
    ids = probes.windows[probes.rows.unsqueeze(1), probes.cols.unsqueeze(1) + offsets]
    x = embedding[ids].reshape(len(probes.rows), -1).double()
    return (x - x.mean(0)) / (x.std(0) + 1e-12)


@torch.no_grad()
def predicted_distributions(model, probes: ProbeSet, vocab_size: int, batch_size: int = 8) -> torch.Tensor:
    """h_i: the model's next-token distribution at each probe (real vocabulary only)."""
    out = torch.empty(len(probes.rows), vocab_size, dtype=torch.float64)
    for start in range(0, len(probes.windows), batch_size):
        chunk = probes.windows[start: start + batch_size]
        probs = torch.softmax(model(chunk).logits[..., :vocab_size].double(), dim=-1)
        sel = (probes.rows >= start) & (probes.rows < start + len(chunk))
        out[sel] = probs[probes.rows[sel] - start, probes.cols[sel]]
    return out


def kernels(x: torch.Tensor, deltas: Iterable[float]) -> dict[float, torch.Tensor]:
    """Row-normalised Gaussian kernels K_delta over the probes' inputs."""
    sq = torch.cdist(x, x).pow(2)
    result = {}
    for delta in deltas:
        g = torch.exp(-sq / (2.0 * delta))  # the diagonal (j = i) is 1, so rows never vanish
        result[delta] = g / g.sum(dim=1, keepdim=True)
    return result


def default_deltas(x: torch.Tensor, fractions=(0.05, 0.1, 0.2, 0.5, 1.0)) -> list[float]:
    """delta as fractions of the median squared distance between probes: the scale of the
    input cloud sets what "low frequency" means, so fixed deltas would not transfer."""
    sq = torch.cdist(x, x).pow(2)
    median = float(sq[~torch.eye(len(x), dtype=torch.bool)].median())
    return [f * median for f in fractions]


def _frob2(op: torch.Tensor, gram: torch.Tensor) -> float:
    """||op @ M||_F^2 for M with Gram matrix gram = M M^T."""
    return float(torch.einsum("ij,jk,ik->", op, gram, op))


def filtered_errors(targets: torch.Tensor, probs: torch.Tensor,
                    kernel_by_delta: dict[float, torch.Tensor]) -> list[dict]:
    """e_low / e_high for every delta (targets: [N] ids, probs: [N, V] float64)."""
    n = len(targets)
    y_gram = (targets.unsqueeze(0) == targets.unsqueeze(1)).double()  # Y Y^T
    diff = -probs
    diff[torch.arange(n), targets] += 1.0  # D = Y - H
    d_gram = diff @ diff.T
    eye = torch.eye(n, dtype=torch.float64)
    rows = []
    for delta, k in kernel_by_delta.items():
        high = eye - k
        rows.append({
            "delta": delta,
            "e_low": (_frob2(k, d_gram) / max(_frob2(k, y_gram), 1e-300)) ** 0.5,
            "e_high": (_frob2(high, d_gram) / max(_frob2(high, y_gram), 1e-300)) ** 0.5,
        })
    return rows


def fprinciple_over_checkpoints(checkpoints: list[str], data_prefix: str, num_samples: int = 1000,
                                context: int = 3, seed: int = 0,
                                reference: Optional[str] = None, progress: bool = False) -> dict:
    """Run the filtering diagnostic on every checkpoint of a run (same probes, same x)."""
    from ..data import IndexedDataset
    from ..train.checkpoint import load_model, read_checkpoint_config, read_meta

    cfg = read_checkpoint_config(checkpoints[-1])
    ds = IndexedDataset(data_prefix)
    stream = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])
    probes = sample_probes(stream, cfg.data.seq_length, num_samples, context, seed)
    ref_model = load_model(reference or checkpoints[-1])
    x = probe_inputs(probes, ref_model.embed_in.weight.detach(), context)
    deltas = default_deltas(x)
    kernel_by_delta = kernels(x, deltas)
    results = []
    iterator = checkpoints
    if progress:
        from tqdm import tqdm
        iterator = tqdm(checkpoints, desc="checkpoints", unit="ckpt")
    for path in iterator:
        model = load_model(path)
        probs = predicted_distributions(model, probes, cfg.model.vocab_size)
        step = read_meta(path).get("step")
        for row in filtered_errors(probes.targets, probs, kernel_by_delta):
            results.append({"step": step, **row})
    return {"num_samples": len(probes.targets), "context": context, "deltas": deltas,
            "reference": reference or checkpoints[-1], "rows": results}
