"""Helpers shared by the family tests: tiny models, real tokens, forced halting patterns."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from megaponder.config import ModelConfig, PonderConfig
from megaponder.models import build_model
from megaponder.models.spec import family_names

#: the family matrix: every family registered when the tests are collected (the built-in
#: ones; tests/test_family_spec.py runs the matrix's checks on a family it registers itself)
ALL_FAMILIES = list(family_names())


BACKBONES = ["neox", "llama"]
#: the llama shape of the tiny models: grouped-query attention (2 kv heads for 4 query heads)
#: and an MLP width that is not 4d, so a formula or cache that assumes either fails
LLAMA_TINY = dict(backbone="llama", rotary_pct=1.0, parallel_residual=False, num_kv_heads=2,
                  intermediate_size=72)


def tiny(family: str, backend: str = "eager", vocab: int = 256, d: int = 32, layers: int = 2,
         heads: int = 4, seed: int = 0, backbone: str = "neox", **ponder):
    torch.manual_seed(seed)
    shape = LLAMA_TINY if backbone == "llama" else {}
    cfg = ModelConfig(family=family, vocab_size=vocab, hidden_size=d, num_layers=layers, num_heads=heads,
                      attention_backend=backend, max_position_embeddings=256, **shape)
    ponder.setdefault("steps", 2)
    return build_model(cfg, PonderConfig(**ponder))


@lru_cache(maxsize=1)
def kjv_bytes() -> torch.Tensor:
    """Real text as byte tokens (vocab 256): the demo corpus's source, no tokenizer needed."""
    try:
        from megaponder.data.demo import kjv_chapters
        text = "\n".join(kjv_chapters()[:40])
    except Exception:  # pragma: no cover - the package is pinned in requirements
        import os
        text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read() * 20
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def real_batch(batch: int, seq: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = kjv_bytes()
    rows = [data[offset + i * (seq + 1): offset + (i + 1) * (seq + 1)] for i in range(batch)]
    x = torch.stack(rows)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _pick_cut(values: torch.Tensor, frac: float) -> float:
    """A threshold with a large margin to every value, putting about ``frac`` below it."""
    v = values.flatten().sort().values
    n = v.numel()
    if n < 2:
        return float(v.min()) - 1.0
    target = max(1, min(n - 1, int(round(frac * n))))
    window = range(max(1, target - max(1, n // 6)), min(n, target + max(1, n // 6)) + 1)
    best = max((i for i in window if i < n), key=lambda i: float(v[i] - v[i - 1]))
    return float((v[best] + v[best - 1]) / 2)


@torch.no_grad()
def force_ada_gates(model, ids: torch.Tensor, frac: float = 0.35, scale: float = 1e3) -> None:
    """Make the gates of an AdaPonderLM decisive functions of H^i (|logit - cut| >> 0) that
    halt about ``frac`` of the still-active tokens at every iteration."""
    logit_tau = math.log(model.ponder_cfg.tau / (1 - model.ponder_cfg.tau))
    for i, gate in enumerate(model.gates):
        gate.fc2.weight.normal_(std=1.0).mul_(scale)
        gate.fc2.bias.zero_()
        captured = []
        handle = gate.register_forward_hook(lambda mod, inp, out: captured.append(out.squeeze(-1)))
        model(ids)
        handle.remove()
        g = captured[0]
        # tokens still active at iteration i under the gates fixed so far
        active = torch.ones_like(g, dtype=torch.bool)
        for j in range(i):
            gj = []
            h2 = model.gates[j].register_forward_hook(lambda mod, inp, out: gj.append(out.squeeze(-1)))
            model(ids)
            h2.remove()
            active &= torch.sigmoid(gj[0]) >= model.ponder_cfg.tau
        cut = _pick_cut(g[active] if active.any() else g, frac)
        gate.fc2.bias.fill_(logit_tau - cut)


@torch.no_grad()
def force_router(model, scale: float = 1e3) -> None:
    """PonderLM-3 router made near one-hot: steps beyond the argmax get w ~ exp(-scale)."""
    model.router.fc2.weight.normal_(std=1.0).mul_(scale)
    model.router.fc2.bias.zero_()
