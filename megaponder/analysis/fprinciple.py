"""A spectral probe of next-token prediction (the F-Principle filtering method on an LM).

The filtering method (megaponder/analysis/spectral.py) needs a target *function* y(x) and
the network's output h(x) *of the same input*. For a language model we define, per probe i:

* **x_i** — a c-token context, embedded with a *fixed reference table* (default: a seeded
  Gaussian table, N(0, 1/e) per entry, e = 64 dimensions per token, independent of any
  model) and concatenated. With that table |x_i − x_j|² ≈ 2 × (number of context positions
  where the two contexts differ), so "low frequency" has a plain meaning here: smooth
  over contexts that share tokens; the highest frequency is a function of the exact context.
* **y_i** — the empirical next-token distribution of that context in the scanned training
  tokens (a function of x). It averages over the context's occurrences, so it is close to
  the true conditional distribution only for frequent contexts; a context seen once has a
  one-hot target (on the demo corpus 192 of 512 probes, median count 2: docs/analysis.md),
  whose sampling noise is high-frequency and inflates e_high.
* **h_i** — the model's next-token distribution computed from *those c tokens only* (the
  model is run on the c-token sequence; position c−1's prediction), so h is a function of x.

Probes are N distinct contexts drawn from random positions of the training tokens (frequent
contexts are drawn more often, as training sees them). δ grid: fractions (0.05, 0.1, 0.2,
0.5, 1) of the median squared distance between probes (≈ 2c with the random table).

Baseline rows come with every probe: **unigram** (the training unigram distribution for every
x: ignores x, so e_high = 1 exactly) and **bigram** (the empirical distribution given only the
last context token: a lower-frequency function of x); the trainer adds the **step-0** model.

Cost (``LMProbe.errors``): one forward over N × c tokens, then D Dᵀ (N² |V| multiply-adds,
D = Y − H) and 2 N² per δ — the kernels enter as precomputed Kᵀ K and (I − K)ᵀ(I − K), since
‖K D‖² = ⟨Kᵀ K, D Dᵀ⟩. Memory: a few N × |V| float64 matrices (N = 512, |V| = 8192: 34 MB each).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.spec import family_spec
from .spectral import filter_forms, filtered_errors_gram, gaussian_kernels, median_squared_distance, squared_distances

DELTA_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)

__all__ = ["DELTA_FRACTIONS", "LMProbe", "build_lm_probe", "random_reference", "read_tokens",
           "context_distributions", "iteration_distributions", "jacobi_distributions",
           "initial_model", "probe_for_run", "fprinciple_over_checkpoints"]


def random_reference(vocab_size: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """The default reference table: seeded N(0, 1/dim) entries, so |e_a − e_b|² ≈ 2 for a ≠ b."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(vocab_size, dim, generator=g, dtype=torch.float64) / dim ** 0.5


def read_tokens(prefixes: Sequence[str], max_tokens: int) -> np.ndarray:
    """The first ``max_tokens`` tokens of the given indexed datasets, in file order."""
    from ..data import IndexedDataset

    parts, total = [], 0
    for prefix in prefixes:
        tokens = IndexedDataset(prefix).all_tokens()[: max_tokens - total]
        parts.append(np.asarray(tokens, dtype=np.int64))
        total += len(parts[-1])
        if total >= max_tokens:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _context_keys(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """One exact int64 key per row of token ids (base-|V| digits, or np.unique's labels when
    |V|^c does not fit in 62 bits)."""
    c = windows.shape[1]
    if vocab_size ** c < 2 ** 62:
        keys = np.zeros(len(windows), np.int64)
        for j in range(c):
            keys = keys * vocab_size + windows[:, j]
        return keys
    return np.unique(windows, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


@dataclass
class LMProbe:
    contexts: torch.Tensor  # [N, c] distinct contexts (token ids)
    target: torch.Tensor  # [N, V] float64: empirical next-token distribution of each context
    counts: torch.Tensor  # [N] occurrences of each context in the scanned tokens
    x: torch.Tensor  # [N, c*e] reference embedding of each context
    fractions: list[float]  # δ = fraction × median squared distance between probes
    vocab_size: int
    meta: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)  # name -> [N, V] predicted distributions

    def __post_init__(self):
        sq = squared_distances(self.x)
        # the scale of the input cloud sets what "low frequency" means, hence relative δ
        self.median_sq = median_squared_distance(sq)
        self.deltas = [f * self.median_sq for f in self.fractions]
        self._forms = filter_forms(gaussian_kernels(sq, self.deltas))
        self._y_gram = self.target @ self.target.T

    def errors(self, probs: torch.Tensor) -> list[dict]:
        """e_low / e_high per δ for predicted distributions ``probs`` [N, V]."""
        d = self.target - probs.double()
        rows = filtered_errors_gram(self._y_gram, d @ d.T, self._forms)
        return [{"delta": r["delta"], "fraction": frac, "e_low": r["e_low"], "e_high": r["e_high"]}
                for r, frac in zip(rows, self.fractions)]

    def baseline_rows(self) -> dict:
        return {name: self.errors(probs) for name, probs in self.baselines.items()}

    def model_errors(self, model, batch_size: int = 256) -> list[dict]:
        return self.errors(context_distributions(model, self.contexts, self.vocab_size, batch_size))

    def describe(self) -> dict:
        return {**self.meta, "num_probes": len(self.contexts), "context": self.contexts.shape[1],
                "deltas": self.deltas, "delta_fractions": self.fractions,
                "median_sq_distance": self.median_sq, "probe_counts_mean": float(self.counts.double().mean()),
                "baselines": self.baseline_rows()}


def build_lm_probe(tokens: np.ndarray, vocab_size: int, context: int = 3, num_probes: int = 512,
                   seed: int = 0, reference: Optional[torch.Tensor] = None, embed_dim: int = 64,
                   fractions: Sequence[float] = DELTA_FRACTIONS) -> LMProbe:
    """Probe N distinct ``context``-token contexts of a token stream (see the module docstring)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) <= context:
        raise ValueError(f"{len(tokens)} tokens are too few for {context}-token contexts")
    if tokens.max() >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    windows = np.lib.stride_tricks.sliding_window_view(tokens, context + 1)
    keys = _context_keys(windows[:, :context], vocab_size)
    rng = np.random.default_rng(seed)
    # random positions; their first distinct contexts (frequent contexts are likelier)
    order = rng.permutation(len(windows))[: max(num_probes * 20, 1000)]
    _, first = np.unique(keys[order], return_index=True)
    picked = order[np.sort(first)][:num_probes]
    if len(picked) < 2:
        raise ValueError("the token stream has fewer than 2 distinct contexts to probe")
    probe_keys = keys[picked]
    sort = np.argsort(probe_keys)
    pos = np.searchsorted(probe_keys[sort], keys).clip(max=len(picked) - 1)
    hit = probe_keys[sort][pos] == keys
    rows = sort[pos[hit]]
    counts = np.zeros((len(picked), vocab_size))
    np.add.at(counts, (rows, windows[hit, context]), 1.0)
    n = counts.sum(1)
    target = torch.from_numpy(counts / n[:, None])
    contexts = torch.from_numpy(np.ascontiguousarray(windows[picked, :context]))

    unigram = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    unigram /= unigram.sum()
    # bigram: next-token distribution given the last context token only
    last = contexts[:, -1].numpy()
    uniq = np.unique(last)
    at = np.searchsorted(uniq, tokens[:-1]).clip(max=len(uniq) - 1)
    seen = uniq[at] == tokens[:-1]
    big_rows = np.zeros((len(uniq), vocab_size))
    np.add.at(big_rows, (at[seen], tokens[1:][seen]), 1.0)
    big = big_rows[np.searchsorted(uniq, last)]
    big /= big.sum(1, keepdims=True)

    ref = random_reference(vocab_size, embed_dim, seed) if reference is None else reference.double()
    x = ref[contexts].reshape(len(picked), -1)
    meta = {"scanned_tokens": int(len(tokens)), "seed": seed,
            "reference": "random" if reference is None else "given", "embed_dim": int(ref.shape[1])}
    return LMProbe(contexts=contexts, target=target, counts=torch.from_numpy(n), x=x,
                   fractions=list(fractions), vocab_size=vocab_size, meta=meta,
                   baselines={"unigram": torch.from_numpy(unigram).expand(len(picked), -1),
                              "bigram": torch.from_numpy(big)})


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def context_distributions(model, contexts: torch.Tensor, vocab_size: int, batch_size: int = 256,
                          **forward_kwargs) -> torch.Tensor:
    """h_i: the model's next-token distribution after the c tokens of context i, run on those
    c tokens alone (eval mode, no grad) -> [N, V] float64 over the real vocabulary."""
    device = next(model.parameters()).device
    out = []
    with _eval_mode(model):
        for start in range(0, len(contexts), batch_size):
            ids = contexts[start: start + batch_size].to(device)
            logits = model(ids, **forward_kwargs).logits[:, -1, :vocab_size]
            out.append(torch.softmax(logits.double(), dim=-1).cpu())
    return torch.cat(out)


@contextmanager
def _recording_head(model):
    """Record every call of ``model.head`` (PonderLM / AdaPonderLM call it once per pondering
    iteration, the last call being the readout)."""
    calls: list[torch.Tensor] = []
    original = model.head
    own = model.__dict__.get("head")  # an instance-level head (e.g. swapped in) to restore

    def head(hidden):
        logits = original(hidden)
        calls.append(logits)
        return logits

    model.head = head
    try:
        yield calls
    finally:
        if own is None:
            del model.head  # back to the class method
        else:
            model.head = own


def iteration_distributions(model, contexts: torch.Tensor, vocab_size: int, batch_size: int = 256) -> list[torch.Tensor]:
    """Per pondering iteration i (0 = the first pass), the distribution the model would
    output if it stopped after pass i+1: head(H^i) at the last position. For AdaPonderLM a
    token that halted keeps the prediction of its last active pass (what its readout uses)."""
    passes = getattr(model, "num_passes", None)
    family = getattr(model, "family", None)
    if passes is None or family is None or family_spec(family).kind != "vertical":
        raise ValueError(f"per-iteration view needs a vertical pondering family (ponderlm, adaponderlm), "
                         f"not {getattr(model, 'family', type(model).__name__)}")
    device = next(model.parameters()).device
    per_iter: list[list[torch.Tensor]] = [[] for _ in range(passes)]
    with _eval_mode(model):
        for start in range(0, len(contexts), batch_size):
            ids = contexts[start: start + batch_size].to(device)
            with _recording_head(model) as calls:
                out = model(ids, return_token_stats=True)
            if len(calls) != passes:
                raise RuntimeError(f"expected {passes} head calls, saw {len(calls)}")
            stacked = torch.stack([c[:, -1, :vocab_size].float() for c in calls])  # [P, B, V]
            executed = out.stats["token_iterations"][:, -1].long().clamp(1, passes)  # passes run
            for i in range(passes):
                src = torch.minimum(torch.full_like(executed, i), executed - 1)
                if i == passes - 1:
                    src = torch.full_like(executed, passes - 1)  # the readout already freezes
                logits = stacked[src, torch.arange(len(ids))]
                per_iter[i].append(torch.softmax(logits.double(), -1).cpu())
    return [torch.cat(chunks) for chunks in per_iter]


def jacobi_distributions(model, contexts: torch.Tensor, vocab_size: int, passes: Sequence[int],
                         batch_size: int = 256) -> dict[int, torch.Tensor]:
    """PonderLM-2 / -3: the output distribution with J Jacobi passes, for each J in ``passes``."""
    if not hasattr(model, "jacobi_count"):
        raise ValueError(f"Jacobi passes exist for ponderlm2 / ponderlm3, not {getattr(model, 'family', '?')}")
    return {int(j): context_distributions(model, contexts, vocab_size, batch_size, jacobi_passes=int(j))
            for j in passes}


def initial_model(cfg):
    """The weights ``megaponder train`` starts from with this config (same seed, same
    build order as the trainer) — the step-0 baseline for runs without a step-0 checkpoint."""
    from ..models import build_model

    if cfg.train.init_checkpoint:
        raise ValueError("the run starts from train.init_checkpoint; probe that checkpoint as its step 0")
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg)


def probe_for_run(cfg, data_prefixes: Optional[Sequence[str]] = None, num_probes: int = 512,
                  context: int = 3, seed: int = 0, scan_tokens: int = 1_000_000,
                  reference: Optional[str] = None) -> LMProbe:
    """The probe of a run's training data (``cfg.data.path`` unless ``data_prefixes``);
    ``reference``: a checkpoint whose standardised input embeddings replace the random table."""
    from ..config import _data_prefixes
    from ..train.checkpoint import load_model

    prefixes = list(data_prefixes or _data_prefixes(cfg.data.path))
    ref = None
    if reference:
        w = load_model(reference).embed_in.weight.detach().double()[: cfg.model.vocab_size]
        ref = (w - w.mean(0)) / (w.std(0) + 1e-12)  # standardised: no direction dominates |x|
    probe = build_lm_probe(read_tokens(prefixes, scan_tokens), cfg.model.vocab_size, context,
                           num_probes, seed, reference=ref)
    probe.meta.update({"data": prefixes, "reference": reference or "random"})
    return probe


def fprinciple_over_checkpoints(checkpoints: list[str], probe: LMProbe, progress: bool = False) -> dict:
    """The probe on every checkpoint of a run (same probes, same x), with the baseline rows
    and, first, the step-0 model (rebuilt from the run's seed) unless a step-0 checkpoint exists."""
    from ..train.checkpoint import load_model, read_checkpoint_config, read_meta

    cfg = read_checkpoint_config(checkpoints[-1])
    desc = probe.describe()
    rows, seconds = [], []
    models = [(read_meta(p).get("step"), p) for p in checkpoints]
    if 0 not in {s for s, _ in models} and not cfg.train.init_checkpoint:
        models.insert(0, (0, None))
    iterator = models
    if progress:
        from tqdm import tqdm
        iterator = tqdm(models, desc="checkpoints", unit="ckpt")
    for step, path in iterator:
        model = initial_model(cfg) if path is None else load_model(path)
        t0 = time.time()
        rows += [{"step": step, **row} for row in probe.model_errors(model)]
        seconds.append(round(time.time() - t0, 3))
    desc.update({"rows": rows, "probe_seconds": seconds})
    return desc
