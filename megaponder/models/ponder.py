"""Vertical recurrence: PonderLM and AdaPonderLM (docs/papers.md §4, §1; docs/families.md).

Every iteration runs the whole shared-weight stack over the whole sequence. Between iterations
each position's predicted distribution becomes a probability-weighted *input* embedding that is
added to its input: ``E <- E + softmax(head(H)) @ W_in`` (times sqrt(d) with ``scale_embeds``).

AdaPonderLM adds, per iteration i < K, a gate MLP on H^i -> s^i = sigmoid(.), a monotonic
halting mask m^{i+1} = m^i & (s^i >= tau), the gated update E += m^{i+1} s^i e^i and, in every
layer, KV reuse: K,V <- where(m^i, K_new, K_prev) so that a halted token stays in the causal
context with the K/V of its last active iteration. Training computes every row densely and
selects with ``where`` (static shapes), or with ``ponder.train_compaction`` only the active rows
(megaponder/models/compaction.py, exact); megaponder/models/decoders.py computes only the active
rows at inference and gives the same logits (tests/test_families_consistency.py).

The halting machinery is shared with the fixed-pruning and random-halting baselines
(megaponder/models/baselines.py), which differ only in how the mask is decided.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelConfig
from .ponder_args import PonderConfig
from .base import CausalLM, ModelOutput, default_position_ids
from .chunked import linear_softmax_matmul
from .compaction import RowCompaction
from .spec import DECODERS, STATIC_DECODER, FamilySpec, register_family

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class GateMLP(nn.Module):
    """Two-layer MLP -> one logit per token (AdaPonderLM gate, PonderLM-3 router with
    ``out_features = K+1``)."""

    def __init__(self, d: int, hidden: int, out_features: int, activation: str, bias_init: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, out_features)
        nn.init.normal_(self.fc1.weight, std=init_std)
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=init_std)
        nn.init.zeros_(self.fc2.bias)
        with torch.no_grad():
            self.fc2.bias[-1] = bias_init

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(h)))


class PonderMixin:
    """Vocabulary-sized operations behind overridable methods (tensor parallelism swaps in
    vocab-parallel versions): ``head`` / ``embed`` / ``lm_loss`` come from CausalLM;
    ``ponder_embedding`` lives here."""

    def ponder_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ embed_in.weight (the *input* table), optionally over the top-k
        logits only. Unscaled; callers multiply by ``embed_scale``."""
        if self.vocab_ops is not None:   # vocabulary split across ranks
            return self.vocab_ops.ponder_embedding(logits, self.embed_in.weight)
        k = self.ponder_cfg.top_k
        weight = self.embed_in.weight
        if k and k < logits.shape[-1]:
            vals, idx = torch.topk(logits.float(), k, dim=-1)
            probs = torch.softmax(vals, dim=-1).to(weight.dtype)
            return torch.einsum("...k,...kd->...d", probs, F.embedding(idx, weight))
        probs = torch.softmax(logits.float(), dim=-1).to(weight.dtype)
        return probs @ weight

    #: data-parallel layout of the draws (set_draw_layout); the single process is (0, 1)
    _draw_offset, _draw_stride = 0, 1

    def set_draw_layout(self, offset: int, stride: int) -> None:
        """The i-th forward of a training step on this data-parallel rank is global
        micro-batch ``i*stride + offset`` (the trainer's interleaved sharding: offset = dp
        rank, stride = dp size), so each micro-batch's seeded draws equal the single process's."""
        self._draw_offset, self._draw_stride = int(offset), int(stride)

    def sample_generator(self, salt: int = 0, per_step: bool = False) -> torch.Generator:
        """CPU generator seeded from (ponder.sample_seed, training step, global micro-batch of
        this step) in training and from the seed alone in eval, so draws are reproducible
        across resumes and identical for every parallel layout (set_draw_layout).
        ``per_step``: one draw for the whole optimizer step (every micro-batch and every
        data-parallel rank alike), for draws that change the *structure* of the forward (the
        Jacobi count: ZeRO-3 needs the same module calls on every rank)."""
        if self.training:
            call = 0
            if not per_step:
                call = self._calls_this_step * self._draw_stride + self._draw_offset
                self._calls_this_step += 1
            return self.training_generator(salt, call)
        else:
            seed = self.ponder_cfg.sample_seed * 1_000_003 + 17 + salt
        return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

    def training_generator(self, salt: int, call: int = 0) -> torch.Generator:
        """The training draws' generator of global micro-batch ``call`` of the current step
        (``call=0``: the per-step draw), whatever mode the module is in now."""
        seed = (self.ponder_cfg.sample_seed * 1_000_003 + self.training_step * 7919 + call * 31 + salt)
        return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

    def set_step(self, step: int) -> None:
        self.training_step = step
        self._calls_this_step = 0
        # the step's bottom-k fraction as a float, so the forward never reads the step number
        # (a whole-model torch.compile would guard on it and recompile every step)
        self._step_bottomk = self.bottomk_fraction(step) if hasattr(self, "bottomk_fraction") else None

    #: the bottom-k fraction of the step set_step set (None: computed from training_step)
    _step_bottomk = None

    #: which evaluation batch the next eval-mode forward is (set_eval_stream)
    _eval_stream = 0

    def set_eval_stream(self, stream: int) -> None:
        """Eval-mode draws of the next forwards belong to evaluation batch ``stream``
        (megaponder/train/evaluate.py sets the global batch index), so every batch draws its
        own pattern, reproducibly; the cached decoder draws the same numbers for stream =
        its ``seed`` (eval_uniforms)."""
        self._eval_stream = int(stream)

    def eval_uniforms(self, rows: torch.Tensor, positions: torch.Tensor, stream: int,
                      salt: int = 0) -> torch.Tensor:
        """Counter-based uniforms in [0, 1): one per (row, sequence position) of evaluation
        batch ``stream``, a pure function of (ponder.sample_seed, salt, stream, row, position),
        so the parallel forward (all positions at once) and the decoder (positions as they
        arrive, in any chunks) draw the same number for the same token."""
        mask = 0xFFFFFFFF

        def fmix(h):   # murmur3's 32-bit finaliser on int64 tensors holding 32-bit values
            h = h ^ (h >> 16)
            h = (h * 0x85EBCA6B) & mask
            h = h ^ (h >> 13)
            h = (h * 0xC2B2AE35) & mask
            return h ^ (h >> 16)

        key = (self.ponder_cfg.sample_seed * 1_000_003 + salt * 7919 + int(stream)) & mask
        h = fmix(torch.full_like(rows, key, dtype=torch.int64))
        h = fmix(h ^ (rows.to(torch.int64) & mask))
        h = fmix(h ^ (positions.to(torch.int64) & mask))
        return (h >> 8).to(torch.float32) / float(1 << 24)   # 24 bits: exact in float32


def valid_token_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.bool()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


class PonderLM(PonderMixin, CausalLM):
    """PonderLM; with ``adaptive`` the halting machinery of AdaPonderLM and the baselines."""

    adaptive = False

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        super().__init__(cfg, ponder)
        p = self.ponder_cfg
        self.num_passes = p.steps + 1
        self.embed_scale = math.sqrt(cfg.hidden_size) if p.scale_embeds else 1.0
        self._calls_this_step = 0

    # -- pieces ---------------------------------------------------------------------------
    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(input_ids) * self.embed_scale
        if self.ponder_cfg.multiply_steps and self.ponder_cfg.steps > 0:
            e = e * self.ponder_cfg.steps
        return e

    def ponder_update(self, logits: torch.Tensor) -> torch.Tensor:
        return self.ponder_embedding(logits) * self.embed_scale

    def ponder_update_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """ponder_update(head(hidden)); chunked over tokens with ``model.loss_chunk_size`` so
        no pass keeps its [B, T, V] logits and probabilities for the backward."""
        chunk = self.chunked_vocab()
        if (chunk and not self.ponder_cfg.top_k
                and getattr(self.ponder_embedding, "__func__", None) is PonderMixin.ponder_embedding):
            return linear_softmax_matmul(hidden, self.embed_out.weight, self.embed_in.weight,
                                         chunk) * self.embed_scale
        return self.ponder_update(self.head(hidden))

    def halting_plan(self, batch: int, seq: int, device, valid: torch.Tensor) -> Optional[torch.Tensor]:
        """Baselines: [passes, B, T] bool activity decided before the forward (None: gates)."""
        return None

    def gate_values(self, i: int, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """s^i [.., T] in (0, 1) multiplying the update of iteration i (None: 1)."""
        return None

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None, return_token_stats: bool = False) -> ModelOutput:
        """``return_token_stats=True`` adds ``stats["token_iterations"]``: a detached float
        [B, T] tensor with the number of iterations each token executed (1 + the iteration at
        which it halted; K+1 for tokens that never halt) — what megaponder/analysis/depth.py
        correlates with the token's NLL. Off by default (stats otherwise hold scalars only)."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        spec = self.attention_spec(attention_mask, segment_ids)
        valid = valid_token_mask(input_ids, attention_mask)
        p = self.ponder_cfg
        passes = self.num_passes
        e = self.input_embeddings(input_ids)
        active = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        plan = self.halting_plan(b, t, input_ids.device, valid) if self.adaptive else None
        actives, gates = [active], []
        prev_kv, h_read, hidden = None, None, None
        for i in range(passes):
            hook, comp = None, None
            if self.adaptive and i > 0 and p.train_compaction:
                # only the active tokens run (models/compaction.py says why that is exact)
                comp = hook = RowCompaction(active, prev_kv, detach=not p.kv_reuse_grad)
            elif self.adaptive and i > 0:
                hook = _ReuseKV(active, prev_kv, detach=not p.kv_reuse_grad)
            x, pos, x_spec = (e, position_ids, spec) if comp is None else comp.inputs(e, position_ids, spec)
            hidden, kvs = self.stack(x, pos, x_spec, kv_hook=hook)
            prev_kv = kvs
            if h_read is None or not self.adaptive:
                h_read = hidden
            elif comp is not None:
                h_read = comp.put(h_read, hidden)
            else:
                h_read = torch.where(active.unsqueeze(-1), hidden, h_read)
            if i == passes - 1:
                break
            s = self.gate_values(i, hidden)
            if comp is not None and s is not None:
                s = comp.spread(s, active)   # halted tokens' gates: 0, masked out below anyway
            if plan is not None:
                new_active = active & plan[i + 1]
            elif s is not None:
                new_active = active & (s >= p.tau)
                gates.append((s, active))
            else:
                new_active = active
            weight = new_active.to(e.dtype) if s is None else s.to(e.dtype) * new_active.to(e.dtype)
            update = self.ponder_update_from_hidden(hidden)
            if comp is None:
                e = e + weight.unsqueeze(-1) * update
            else:   # the packed tokens' updates only (everyone else's weight is 0)
                e = comp.add(e, comp.take(weight).unsqueeze(-1) * update)
            active = new_active
            actives.append(active)
        if p.halted_readout == "final" or not self.adaptive:
            h_read = hidden
        stats = self._stats(actives, valid, t)
        if return_token_stats:
            stats["token_iterations"] = torch.stack(actives).sum(0).float().detach()
        if targets is None:
            return ModelOutput(logits=self.head(h_read), stats=stats)
        logits, lm_loss = self.head_and_loss(h_read, targets)
        loss = lm_loss
        if gates:
            ponder_loss = self.bottomk_loss(gates, valid)
            if ponder_loss is not None:
                loss = loss + p.halting_loss_weight * ponder_loss
                stats["ponder_loss"] = ponder_loss.detach()
            stats["gate_mean"] = masked_mean(torch.stack([g for g, _ in gates]),
                                             torch.stack([a & valid for _, a in gates])).detach()
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, stats=stats)

    # -- losses and stats -------------------------------------------------------------------
    def bottomk_fraction(self, step: Optional[int] = None) -> float:
        p = self.ponder_cfg
        step = self.training_step if step is None else step
        if step < p.halting_warmup_start:
            return 0.0
        if p.halting_warmup_end <= p.halting_warmup_start or step >= p.halting_warmup_end:
            return p.halting_k_max
        return p.halting_k_max * (step - p.halting_warmup_start) / (p.halting_warmup_end - p.halting_warmup_start)

    def bottomk_loss(self, gates, valid) -> Optional[torch.Tensor]:
        """Mean of the smallest k = frac * (all gate slots) gate values of the batch."""
        frac = self._step_bottomk if self._step_bottomk is not None else self.bottomk_fraction()
        if frac <= 0.0 or self.ponder_cfg.halting_loss_weight == 0.0:
            return None
        s = torch.stack([g for g, _ in gates]).float()
        if self.ponder_cfg.bottomk_pool == "active":
            pool = torch.stack([a & valid for _, a in gates])
        else:
            pool = valid.unsqueeze(0).expand_as(s)
        vals = torch.where(pool, s, torch.full_like(s, float("inf"))).flatten()
        k = max(1, int(round(frac * vals.numel())))
        smallest = torch.topk(vals, k, largest=False).values
        finite = torch.isfinite(smallest)
        return torch.where(finite, smallest, torch.zeros_like(smallest)).sum() / finite.sum().clamp_min(1)

    def _stats(self, actives, valid, seq_len: int) -> dict:
        from .flops import flops_ratio_tensor
        act = torch.stack(actives).float()  # [P, B, T]
        v = valid.float()
        n = v.sum().clamp_min(1.0)
        stats = {"mean_iters": (act * v).sum() / n}
        for i in range(act.shape[0]):
            stats[f"active_frac/{i}"] = (act[i] * v).sum() / n
        per_pos = (act * v).sum(1) / v.sum(0).clamp_min(1.0)  # [P, T]
        # float32 on the device, as the value was before (no host read in the step)
        stats["flops_ratio"] = flops_ratio_tensor(self, per_pos).float()
        return {k: (x.detach() if torch.is_tensor(x) else x) for k, x in stats.items()}


class _ReuseKV:
    """KV reuse as a kv_hook: K,V <- where(m, K_new, K_prev), m [B, T] broadcast to
    [B, 1, T, 1]. ``rows(sl)`` is the same hook for a slice of the batch rows (the pipeline
    runs a stack call in row chunks; see megaponder/parallel/pipeline.py)."""

    def __init__(self, active: torch.Tensor, prev_kv, detach: bool):
        self.active, self.prev_kv, self.detach = active, prev_kv, detach

    def rows(self, sl: slice) -> "_ReuseKV":
        prev = [None if kv is None else (kv[0][sl], kv[1][sl]) for kv in self.prev_kv]
        return _ReuseKV(self.active[sl], prev, self.detach)

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        m = self.active[:, None, :, None]
        k_prev, v_prev = self.prev_kv[layer]
        if self.detach:
            k_prev, v_prev = k_prev.detach(), v_prev.detach()
        return torch.where(m, k, k_prev), torch.where(m, v, v_prev)


class AdaPonderLM(PonderLM):
    """PonderLM with iteration-specific gates, monotonic halting (tau), KV reuse and the
    bottom-k gate loss."""

    adaptive = True

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None):
        super().__init__(cfg, ponder)
        p, d = self.ponder_cfg, cfg.hidden_size
        in_std = math.sqrt(2.0 / (5.0 * d))
        self.gates = nn.ModuleList(
            GateMLP(d, p.gate_hidden_mult * d, 1, p.gate_activation, p.gate_bias_init, in_std)
            for _ in range(p.steps))

    def gate_values(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gates[i](hidden).squeeze(-1).float())

    def every_gate(self):
        """A function (hidden [.., d], first=0, stop=K) -> s [.., stop - first] of the gates of
        iterations first..stop-1 at once, on a snapshot of the gate weights (one matmul per
        gate layer instead of one per gate; a range is a slice of the weights, no copy): for a
        decoder whose batch rows sit at different iterations (models/staggered.py). Build it
        again after the weights change."""
        w1 = torch.cat([g.fc1.weight for g in self.gates]).detach()          # [K * h, d]
        b1 = torch.cat([g.fc1.bias for g in self.gates]).detach()
        w2 = torch.stack([g.fc2.weight[0] for g in self.gates]).detach()     # [K, h]
        b2 = torch.stack([g.fc2.bias[0] for g in self.gates]).detach()
        act, count, width = self.gates[0].act, w2.shape[0], w2.shape[1]

        def gates(hidden: torch.Tensor, first: int = 0, stop: int = count) -> torch.Tensor:
            rows = slice(first * width, stop * width)
            inner = act(torch.nn.functional.linear(hidden, w1[rows], b1[rows]))
            inner = inner.view(*hidden.shape[:-1], stop - first, width)
            return torch.sigmoid(((inner * w2[first:stop]).sum(-1) + b2[first:stop]).float())

        return gates

    def open_gates(self, tol: float) -> None:
        """Gates that keep a loaded PonderLM's function: s = 1 - tol for every token (zero
        output weights, bias logit(1 - tol)), so E += s*update differs from PonderLM's E +=
        update by tol*update and no token halts (1 - tol >= tau). Adam's normalised steps
        move the bias and the zeroed weights at the usual rate despite the small sigmoid
        slope there, and the zero weights get gradients from the first step on."""
        if not 0.0 < tol < 1.0 - self.ponder_cfg.tau:
            raise ValueError(f"ponder.gate_preserve_tol must lie in (0, 1 - tau), got {tol}")
        with torch.no_grad():
            for gate in self.gates:
                gate.fc2.weight.zero_()
                gate.fc2.bias.fill_(math.log((1.0 - tol) / tol))


def preserve_loaded_function(model: nn.Module, source_family: str) -> bool:
    """Continued pretraining of AdaPonderLM from a PonderLM checkpoint: open the fresh gates
    (``ponder.gate_preserve_tol``; AdaPonderLM.open_gates) so the first step starts from the
    loaded model's function. Returns whether it changed anything."""
    tol = model.ponder_cfg.gate_preserve_tol
    if source_family != "ponderlm" or getattr(model, "family", "") != "adaponderlm" or tol is None:
        return False
    model.open_gates(tol)
    return True


def init_family_from_backbone(model: nn.Module, backbone_state_dict: dict, strict: bool = True) -> dict:
    """Load a vanilla/Pythia megaponder state dict (``megaponder/convert/hf.py`` names) into any
    family. Backbone tensors are copied unchanged; the family's new parameters (gates, routers,
    pause embedding: ``model.extra_parameter_names()``) keep the initialisation the model was
    built with (``ponder.gate_bias_init``, ``ponder.router_bias_init``, ...). Returns
    ``{"loaded": [...], "fresh": [...], "ignored": [...]}``; with ``strict`` a backbone tensor
    missing from the state dict or a shape mismatch raises."""
    fresh = set(model.extra_parameter_names())
    own = model.state_dict()
    loaded, ignored, missing = [], [], []
    with torch.no_grad():
        for name, tensor in own.items():
            if name in fresh:
                continue
            if name not in backbone_state_dict:
                missing.append(name)
                continue
            src = backbone_state_dict[name]
            if tuple(src.shape) != tuple(tensor.shape):
                raise ValueError(f"init_family_from_backbone: '{name}' has shape {tuple(src.shape)} in "
                                 f"the backbone but {tuple(tensor.shape)} in the {model.family} model "
                                 f"(check model.padded_vocab_size / hidden_size).")
            tensor.copy_(src.to(tensor.dtype))
            loaded.append(name)
        ignored = [k for k in backbone_state_dict if k not in own]
    if strict and missing:
        raise KeyError(f"init_family_from_backbone: backbone tensors missing from the state dict: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {"loaded": loaded, "fresh": sorted(fresh), "ignored": ignored, "missing": missing}


# -- family specs (megaponder/models/spec.py) ---------------------------------------------
#: PonderConfig keys of every vertical pondering family
VERTICAL_PONDER_KEYS = ("steps", "scale_embeds", "multiply_steps", "top_k", "depth_scaled_init",
                        "sample_seed")
#: and of the vertical families that halt tokens (AdaPonderLM's machinery)
HALTING_PONDER_KEYS = ("tau", "halted_readout", "kv_reuse_grad", "bottomk_pool")


def _register() -> None:
    from .flops import vertical_inference_flops, vertical_train_flops
    vertical = dict(kind="vertical", decoder=DECODERS + "VerticalDecoder", recurrent=True,
                    static_decoder=STATIC_DECODER,
                    train_flops=vertical_train_flops,
                    inference_flops=vertical_inference_flops, sequence_parallel=True)
    register_family(FamilySpec(name="ponderlm", model_cls=PonderLM, ponder_keys=VERTICAL_PONDER_KEYS,
                               **vertical))
    register_family(FamilySpec(
        name="adaponderlm", model_cls=AdaPonderLM, halting="gate", extra_parameters=("gates",),
        iteration_kind="iterations until halted (1 + halting iteration)", full_depth_tau=0.0,
        ponder_keys=VERTICAL_PONDER_KEYS + HALTING_PONDER_KEYS + (
            "gate_hidden_mult", "gate_activation", "gate_bias_init", "gate_preserve_tol",
            "halting_loss_weight", "halting_k_max", "halting_warmup_start", "halting_warmup_end",
            "freeze_backbone"),
        **vertical))


_register()
