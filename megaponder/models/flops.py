"""Analytic FLOPs for every family (docs/families.md "FLOPs convention").

Convention (stated because frameworks and papers count FLOPs differently):

* Only matrix multiplications count, 2 FLOPs per multiply-add (2·m·n·k), exactly what
  ``torch.utils.flop_counter.FlopCounterMode`` counts; embedding lookups, norms, softmax,
  rotary and the ``where`` of KV reuse are free. Tests check the formulas against
  FlopCounterMode (eager attention) within 2%.
* Per layer and query row (GPT-NeoX): QKV 2·3d², attention-out 2·d², MLP 2·2·d·f; (LLaMA)
  q and o 2·d² each, k and v 2·d·(num_kv_heads·head_dim) each, SwiGLU 2·3·d·f; both: attention
  4·d·n_keys (QKᵀ plus AV over the keys the kernel is given). The head is 2·d·V (padded
  vocabulary), the pondering embedding softmax(logits)·W_in another 2·V·d (2·k·d with top-k),
  an AdaPonderLM gate 2·(d·h + h), a PonderLM-3 router 2·(d·h + h·(K+1)), the PonderLM-3
  mixture Σ_k s_k h_k 2·(K+1)·d.
* **Training** (``training_flops``): the dense training forward as executed — every row of
  every pass, attention over the whole (interleaved) sequence per query (mask-based kernels
  compute the full square; ``causal=True`` counts only the unmasked pairs instead) — times 3
  for forward + backward (the backward of a matmul is two matmuls of the same size).
* **Inference** (``inference_flops``): KV-cached decoding, token by token, of a sequence: a
  computed row at sequence position p attends exactly the keys in the cache plus itself
  (p+1 for vertical families, the kept latent keys for latent ones); halted AdaPonderLM rows
  and pruned PonderLM-3 steps cost nothing; reused keys of halted tokens do count as keys.

Two scales of compute against vanilla, both logged (metric names as in the run's
metrics.jsonl, the training summary and ``megaponder eval``'s JSON):

* ``mean_iters`` — **backbone passes per token** (vertical families: iterations of the stack a
  token executes; latent families: backbone steps 1 + K-hat per token). This is the papers'
  ratio: PonderLM and the loop baseline at K=3 are "4x", AdaPonderLM's "3.8x" / "3.7x" and
  PonderLM-3's steps are on this scale. It ignores the head, the pondering embedding, the gates
  and the longer attention context of latent thoughts.
* ``flops_ratio`` — inference matmul FLOPs of the family at the realised activity / inference
  FLOPs of the vanilla model of the same shape on the same sequence length, everything above
  counted. PonderLM at K=3 with every token active is ~5.5 at the Pythia-70M shape, 4.4 at
  410M, 4.1 at 2.8B (tests/test_fidelity.py): the head and pondering embedding per extra pass
  weigh most in small models. No paper reports this number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .spec import family_spec, require


@dataclass
class Dims:
    family: str
    d: int
    layers: int
    ffn: int
    vocab: int
    steps: int
    gate_hidden: int
    router_hidden: int
    top_k: int
    pause: int
    readout_final: bool
    buildup: bool
    #: (in, out) of every matmul of one layer, from the backbone spec (models/backbones.py);
    #: empty means the GPT-NeoX layer (QKV, out, fc1, fc2)
    matmuls: tuple = ()

    @classmethod
    def of(cls, model=None, cfg=None, ponder=None, family: Optional[str] = None) -> "Dims":
        if model is not None:
            cfg, ponder = model.cfg, model.ponder_cfg
            family = family or model.family
        if ponder is None:
            from .ponder_args import PonderConfig
            ponder = PonderConfig()
        family = family or cfg.family
        d = cfg.hidden_size
        return cls(family=family, d=d, layers=cfg.num_layers, ffn=cfg.ffn_size, vocab=cfg.padded_vocab(),
                   steps=ponder.steps, gate_hidden=ponder.gate_hidden_mult * d,
                   router_hidden=ponder.router_hidden_mult * d, top_k=ponder.top_k,
                   pause=ponder.pause_tokens, readout_final=ponder.halted_readout == "final",
                   buildup=ponder.buildup_passes, matmuls=_layer_matmuls(cfg))

    # per-row pieces (forward)
    def layer_linear(self) -> int:
        if self.matmuls:
            return 2 * sum(i * o for i, o in self.matmuls)
        d = self.d
        return 2 * (3 * d * d + d * d + 2 * d * self.ffn)

    def row(self, n_keys: float) -> float:
        """One query row through the whole stack attending n_keys keys."""
        return self.layers * (self.layer_linear() + 4 * self.d * n_keys)

    def rows(self, n: int, n_keys: int, causal: bool = False) -> float:
        """n query rows over a chunk of n_keys keys (dense square, or causal pairs only)."""
        if not causal:
            return n * self.row(n_keys)
        first = n_keys - n  # queries are the last n of the keys
        keys = n * first + n * (n + 1) / 2
        return self.layers * (n * self.layer_linear() + 4 * self.d * keys)

    @property
    def head(self) -> int:
        return 2 * self.d * self.vocab

    @property
    def pemb(self) -> int:
        k = self.top_k if 0 < self.top_k < self.vocab else self.vocab
        return 2 * k * self.d

    @property
    def gate(self) -> int:
        return 2 * (self.d * self.gate_hidden + self.gate_hidden) if self.halting == "gate" else 0

    @property
    def kind(self) -> str:
        return family_spec(self.family).kind

    @property
    def halting(self) -> str:
        return family_spec(self.family).halting

    @property
    def router(self) -> int:
        h = self.router_hidden
        return 2 * (self.d * h + h * (self.steps + 1))

    @property
    def passes(self) -> int:
        return self.steps + 1


def _layer_matmuls(cfg) -> tuple:
    from .backbones import backbone_spec

    return tuple(backbone_spec(getattr(cfg, "backbone", "neox")).layer_matmuls(cfg))


def _dims(model=None, cfg=None, ponder=None, family=None) -> Dims:
    return model if isinstance(model, Dims) else Dims.of(model, cfg, ponder, family)


# -- training ------------------------------------------------------------------------------
def training_forward_flops(model=None, seq_len: int = 0, *, cfg=None, ponder=None, family=None,
                           jacobi_passes: Optional[float] = None, causal: bool = False) -> float:
    """FLOPs of one dense training forward over one sequence of ``seq_len`` tokens.
    ``jacobi_passes`` (latent families) defaults to the mean of ``ponder.jacobi_passes``."""
    dm = _dims(model, cfg, ponder, family)
    t, f = seq_len, dm.family
    if jacobi_passes is None and family_spec(f).jacobi:
        p = model.ponder_cfg if hasattr(model, "ponder_cfg") else ponder
        jacobi_passes = sum(p.jacobi_passes) / len(p.jacobi_passes)
    return require(f, "train_flops")(dm, t, causal, jacobi_passes)


# the families' formulas (each FamilySpec names its pair: train_flops, inference_flops)
def vanilla_train_flops(dm: Dims, t: int, causal: bool, jacobi_passes=None) -> float:
    return dm.rows(t, t, causal) + t * dm.head


def loop_train_flops(dm: Dims, t: int, causal: bool, jacobi_passes=None) -> float:
    """K+1 stack passes, one head."""
    return dm.passes * dm.rows(t, t, causal) + t * dm.head


def vertical_train_flops(dm: Dims, t: int, causal: bool, jacobi_passes=None) -> float:
    """ponderlm, adaponderlm, fixed_pruning, random_halting: dense (every token, every pass)."""
    P = dm.passes
    return P * dm.rows(t, t, causal) + (P - 1) * t * (dm.head + dm.pemb + dm.gate) + t * dm.head


def pause_train_flops(dm: Dims, t: int, causal: bool, jacobi_passes=None) -> float:
    s = dm.pause + 1
    return dm.rows(s * t, s * t, causal) + t * dm.head


def latent_train_flops(dm: Dims, t: int, causal: bool, jacobi_passes: float) -> float:
    """ponderlm2 / ponderlm3: build-up passes, Jacobi passes and the final pass."""
    k, s = dm.steps, dm.steps + 1
    total = 0.0
    n_passes = jacobi_passes + 1
    if dm.buildup:
        total += sum(dm.rows((j + 1) * t, (j + 1) * t, causal) for j in range(k))
        n_passes += k
    total += (jacobi_passes + 1) * dm.rows(s * t, s * t, causal) + t * dm.head
    if dm.halting == "router":
        total += n_passes * t * dm.router + t * 2 * s * dm.d
    return total


def training_flops_per_token(model=None, seq_len: int = 0, **kw) -> float:
    """Forward + backward training FLOPs per token (3x the forward)."""
    return 3.0 * training_forward_flops(model, seq_len, **kw) / seq_len


# -- inference -----------------------------------------------------------------------------
def inference_flops(model=None, seq_len: int = 0, activity=None, *, cfg=None, ponder=None,
                    family=None) -> float:
    """Total KV-cached decoding FLOPs of one sequence of ``seq_len`` tokens.

    ``activity``: vertical adaptive families — [passes, T] (bool or expected fraction) of tokens
    active at each iteration (None: all); ponderlm3 — [T] executed steps per token including
    step 0, i.e. 1 + K̂_t (None: K+1). Other families ignore it."""
    return float(inference_flops_tensor(model, seq_len, activity, cfg=cfg, ponder=ponder,
                                        family=family))


def inference_flops_tensor(model=None, seq_len: int = 0, activity=None, *, cfg=None, ponder=None,
                           family=None):
    """:func:`inference_flops` as a float64 0-d tensor on ``activity``'s device (or a float
    for families whose cost does not depend on it): computed without reading the activity on
    the host, so a training step can log it without a device sync."""
    dm = _dims(model, cfg, ponder, family)
    return require(dm.family, "inference_flops")(dm, seq_len, activity)


def cached_rows(dm: Dims, t: int) -> float:
    """One stack pass over t tokens decoded with a KV cache (token i attends i+1 keys)."""
    return float(sum(dm.row(k) for k in range(1, t + 1)))


def vanilla_inference_flops(dm: Dims, t: int, activity=None) -> float:
    return cached_rows(dm, t) + t * dm.head


def loop_inference_flops(dm: Dims, t: int, activity=None) -> float:
    return dm.passes * cached_rows(dm, t) + t * dm.head


def vertical_inference_flops(dm: Dims, t: int, activity=None):
    P = dm.passes
    if activity is None:
        a = torch.ones(P, t, dtype=torch.float64)
    else:
        a = torch.as_tensor(activity).to(torch.float64)
    a = a.reshape(P, -1)[:, :t]
    a_row = a.clone()
    if dm.readout_final and dm.halting != "none":
        a_row[-1] = 1.0
    # token i of the cache attends i keys: dm.row(i) for every i, as one vector (exact: the
    # values are integers below 2**53)
    keys = torch.arange(1, t + 1, dtype=torch.float64, device=a.device)
    row_cost = dm.layers * (dm.layer_linear() + 4 * dm.d * keys)
    total = (a_row * row_cost).sum()
    total += a_row.sum() * dm.head  # every computed row's logits (readout or pondering)
    total += a[:-1].sum() * dm.gate + a[1:].sum() * dm.pemb
    return total


def pause_inference_flops(dm: Dims, t: int, activity=None):
    """pause: pause+1 steps per token."""
    return _latent_flops(dm, t, torch.full((t,), float(dm.pause + 1), dtype=torch.float64))


def latent_inference_flops(dm: Dims, t: int, activity=None):
    """ponderlm2: K+1 steps per token; ponderlm3: ``activity`` = executed steps per token
    (None: K+1) plus the router (a tensor on ``activity``'s device: no host read)."""
    if dm.halting != "router" or activity is None:
        n = torch.full((t,), float(dm.steps + 1), dtype=torch.float64)
    else:
        n = torch.as_tensor(activity).to(torch.float64).reshape(-1)[:t]
    return _latent_flops(dm, t, n)


def _latent_flops(dm: Dims, t: int, n: torch.Tensor):
    """Interleaved decoding with n[i] steps for token i."""
    before = torch.cumsum(n, 0) - n  # kept keys of earlier tokens
    # step k of token t attends before_t + k + 1 keys; sum over k < n_t
    key_sum = n * before + n * (n + 1) / 2
    total = dm.layers * (n.sum() * dm.layer_linear() + 4 * dm.d * key_sum.sum()) + t * dm.head
    if dm.halting == "router":
        total += t * dm.router + 2 * dm.d * n.sum()
    return total


def inference_flops_per_token(model=None, seq_len: int = 0, activity=None, **kw) -> float:
    return inference_flops(model, seq_len, activity, **kw) / seq_len


def flops_ratio_from_activity(model, activity, seq_len: Optional[int] = None) -> float:
    """Inference FLOPs at this activity / vanilla inference FLOPs (same shape, same length)."""
    return float(flops_ratio_tensor(model, activity, seq_len))


def flops_ratio_tensor(model, activity, seq_len: Optional[int] = None):
    """:func:`flops_ratio_from_activity` as a float64 0-d tensor on ``activity``'s device,
    read by nobody until the step's statistics are logged (no host sync in the step)."""
    a = torch.as_tensor(activity)
    t = seq_len or a.shape[-1]
    dm = _dims(model)
    return inference_flops_tensor(dm, t, a) / _vanilla_inference_flops(dm, t)


_FIXED_RATIOS: dict = {}


def _vanilla_inference_flops(dm: Dims, t: int) -> float:
    """The vanilla model's cost of the same shape: host arithmetic only (no tensor)."""
    return vanilla_inference_flops(Dims(**{**dm.__dict__, "family": "vanilla"}), t)


@torch.compiler.assume_constant_result
def fixed_flops_ratio(model, seq_len: int) -> float:
    """``flops_ratio`` of a family whose every token runs every pass (loop, pause, PonderLM-2,
    PonderLM without halting): a function of the shape and length only, computed once per
    (shape, length) and then taken from a cache, so a training step reads no tensor for it.
    A constant for torch.compile too (``assume_constant_result``: evaluated while tracing)."""
    dm = _dims(model)
    key = (repr(dm), int(seq_len))
    if key not in _FIXED_RATIOS:
        _FIXED_RATIOS[key] = flops_ratio_from_activity(dm, _full_activity(dm, seq_len), seq_len)
    return _FIXED_RATIOS[key]


def schedule_for_ratio(model, target: float, kind: str, seq_len: int = 128) -> list[float]:
    """Per-iteration kept fractions r_0=1 >= r_1 >= ... for a vertical halting baseline whose
    expected inference ``flops_ratio`` equals ``target`` (clamped to what is reachable).
    kind: 'uniform' (r_i = 1 - i*delta) or 'geometric' (r_i = q^i)."""
    dm = _dims(model)
    P = dm.passes

    def fracs(x: float) -> list[float]:  # x in [0, 1]: 0 = no pruning, 1 = prune everything
        if kind == "uniform":
            return [1.0 - i * x / max(P - 1, 1) for i in range(P)]
        q = 1.0 - x
        return [q ** i for i in range(P)]

    def ratio(x: float) -> float:
        r = torch.tensor(fracs(x), dtype=torch.float64).unsqueeze(1).expand(P, seq_len)
        return flops_ratio_from_activity(dm, r, seq_len)

    lo, hi = 0.0, 1.0
    if target >= ratio(lo):
        return fracs(lo)
    if target <= ratio(hi):
        return fracs(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if ratio(mid) > target:
            lo = mid
        else:
            hi = mid
    return fracs((lo + hi) / 2)


def schedule_for_mean_iters(model, target: float, kind: str) -> list[float]:
    """Kept fractions r_0=1 >= r_1 >= ... with sum r_i = ``target`` backbone passes per token
    (the papers' scale; clamped to [1, K+1]). kind: 'uniform' or 'geometric' as
    :func:`schedule_for_ratio`."""
    P = _dims(model).passes
    target = min(max(float(target), 1.0), float(P))
    if kind == "uniform":   # sum_i (1 - i x/(P-1)) = P - x P/2
        x = 0.0 if P == 1 else (P - target) * 2.0 / P
        return [1.0 - i * x / max(P - 1, 1) for i in range(P)]
    lo, hi = 0.0, 1.0      # geometric: sum_i q^i, monotone in q
    for _ in range(80):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(P)) < target:
            lo = mid
        else:
            hi = mid
    q = (lo + hi) / 2
    return [q ** i for i in range(P)]


def summary(model, seq_len: int, activity=None) -> dict:
    """Per-token numbers for logs and docs."""
    return {
        "train_flops_per_token": training_flops_per_token(model, seq_len),
        "inference_flops_per_token": inference_flops_per_token(model, seq_len, activity),
        "flops_ratio": flops_ratio_from_activity(model, activity if activity is not None else
                                                 _full_activity(model, seq_len), seq_len),
    }


def _full_activity(model, seq_len: int):
    dm = _dims(model)
    if dm.kind == "latent":
        return torch.full((seq_len,), float(dm.steps + 1))
    return torch.ones(dm.passes, seq_len)
