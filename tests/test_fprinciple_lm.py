"""The LM spectral probe: the Gram shortcut against the paper's literal formulas, the two
limits that give it meaning (a predictor ignoring x has e_high = 1; the training set's own
conditional distribution has both errors 0) on a synthetic n-gram source, and that h is
computed from the probe's context alone."""
import numpy as np
import torch

from megaponder.analysis.fprinciple import build_lm_probe, context_distributions, iteration_distributions
from megaponder.analysis.spectral import filtered_errors, gaussian_kernels, squared_distances

V, C = 12, 2


def _markov_source(n=20000, seed=0, concentration=0.3):
    """A random second-order Markov chain: p(next | previous two tokens), Dirichlet rows
    (``concentration`` None: a deterministic rule, next = a random function of the two)."""
    rng = np.random.default_rng(seed)
    if concentration is None:
        table = np.eye(V)[rng.integers(0, V, size=(V, V))]
    else:
        table = rng.dirichlet(np.full(V, concentration), size=(V, V))
    cdf, u = table.cumsum(-1), rng.random(n)
    tokens = [int(t) for t in rng.integers(0, V, size=C)]
    for i in range(n):
        tokens.append(min(int(np.searchsorted(cdf[tokens[-2], tokens[-1]], u[i], side="right")), V - 1))
    return np.array(tokens), table


def _true_conditional(probe, table):
    return torch.from_numpy(table[probe.contexts[:, 0].numpy(), probe.contexts[:, 1].numpy()])


def test_gram_shortcut_equals_the_literal_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.softmax(torch.randn(40, 7, generator=g, dtype=torch.float64), -1)
    h = torch.softmax(torch.randn(40, 7, generator=g, dtype=torch.float64), -1)
    ks = gaussian_kernels(squared_distances(x), [0.3, 1.0, 5.0])
    for row in filtered_errors(y, h, ks):
        k = ks[row["delta"]]
        yl, hl = k @ y, k @ h
        assert abs(row["e_low"] - ((yl - hl).norm() / yl.norm()).item()) < 1e-10
        assert abs(row["e_high"] - ((y - yl - h + hl).norm() / (y - yl).norm()).item()) < 1e-10


def test_probe_limits_on_a_synthetic_ngram_source():
    tokens, table = _markov_source()
    probe = build_lm_probe(tokens, V, context=C, num_probes=100, seed=1)
    assert len(probe.contexts) == 100 and len({tuple(c) for c in probe.contexts.tolist()}) == 100
    # the target is the empirical conditional of the scanned tokens; fitting it gives 0
    for row in probe.errors(probe.target):
        assert row["e_low"] < 1e-7 and row["e_high"] < 1e-7, row
    # anything that ignores x (the unigram baseline, any constant) has e_high = 1
    rows = probe.baseline_rows()
    for row in rows["unigram"] + probe.errors(torch.full((len(probe.contexts), V), 1.0 / V)):
        assert abs(row["e_high"] - 1.0) < 1e-9, row
    # the bigram baseline sees the last token only: better than unigram, worse than the truth
    true_rows = probe.errors(_true_conditional(probe, table))
    for uni, big, true in zip(rows["unigram"], rows["bigram"], true_rows):
        assert true["e_high"] < big["e_high"] < uni["e_high"]


def test_true_conditional_distribution_has_zero_error():
    """Deterministic source: the true conditional is the target itself (both errors 0).
    Stochastic source: the true conditional's errors are sampling noise of the empirical
    target and shrink like 1/sqrt(occurrences) (8x the tokens: about 0.35x the error)."""
    tokens, table = _markov_source(3000, seed=3, concentration=None)
    probe = build_lm_probe(tokens, V, context=C, num_probes=100, seed=0)
    for row in probe.errors(_true_conditional(probe, table)):
        assert row["e_low"] < 1e-12 and row["e_high"] < 1e-12, row
    errs = []
    for n in (10000, 80000):
        tokens, table = _markov_source(n, seed=4)
        probe = build_lm_probe(tokens, V, context=C, num_probes=100, seed=0)
        errs.append(probe.errors(_true_conditional(probe, table)))
    for small, large in zip(*errs):
        assert large["e_low"] < 0.55 * small["e_low"] and large["e_high"] < 0.55 * small["e_high"]


class _LastTwo(torch.nn.Module):
    """A 'model' whose logits at position t are the log source probabilities given tokens
    t-1, t: the probe must feed it exactly the context (right-aligned, nothing before)."""

    def __init__(self, table):
        super().__init__()
        self.logp = torch.nn.Parameter(torch.log(torch.from_numpy(table)), requires_grad=False)

    def forward(self, ids):
        from megaponder.models.base import ModelOutput
        prev = torch.cat([ids[:, :1] * 0, ids[:, :-1]], 1)
        return ModelOutput(logits=self.logp[prev, ids])


def test_h_is_computed_from_the_probe_context_alone():
    tokens, table = _markov_source(5000, seed=2)
    probe = build_lm_probe(tokens, V, context=C, num_probes=50, seed=0)
    h = context_distributions(_LastTwo(table), probe.contexts, V, batch_size=7)
    expected = torch.from_numpy(table[probe.contexts[:, 0].numpy(), probe.contexts[:, 1].numpy()])
    assert torch.allclose(h, expected, atol=1e-12)


def test_per_iteration_view_ends_with_the_models_output():
    from megaponder.config import ModelConfig, PonderConfig
    from megaponder.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(family="adaponderlm", vocab_size=V, hidden_size=32, num_layers=1,
                                    num_heads=2, max_position_embeddings=16),
                        PonderConfig(steps=2, tau=0.5))
    contexts = torch.randint(0, V, (20, 3))
    per_iter = iteration_distributions(model, contexts, V, batch_size=8)
    assert len(per_iter) == 3
    assert torch.allclose(per_iter[-1], context_distributions(model, contexts, V), atol=1e-6)
    assert not torch.allclose(per_iter[0], per_iter[-1], atol=1e-6)
