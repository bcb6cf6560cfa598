"""KV-cached incremental inference for every family (docs/families.md "Inference").

``make_decoder(model)`` returns a decoder for one sequence (batch row); ``decoder.feed(ids)``
appends tokens ([1, n]) and returns their logits ([1, n, V]); any chunking of a sequence into
``feed`` calls gives the same logits as the model's training forward (tests check 1e-5 fp32):

* vertical families (vanilla, ponderlm, adaponderlm, fixed_pruning, random_halting) keep one
  K/V cache per iteration and layer. At iteration i only the rows still active are computed
  (queries = active rows, ``AttentionSpec.q_index`` = their positions); the keys of a halted
  row are the K/V of its last active iteration, copied into iteration i's cache without
  compute. A halted token's logits are those of the iteration where it halted
  (``halted_readout: last_active``), or its query row is recomputed in the last iteration on
  the reused K/V (``final``). The pondering embedding is computed only for rows that continue.
* ``loop``: one cache per iteration, all rows.
* latent families (ponderlm2, ponderlm3, pause): one cache; every token runs its steps one at a
  time (token embedding, then each thought fed back), so a routing decision never sees a future
  token. PonderLM-3 evaluates the router at step 0 and computes only the steps with survival
  w >= tau (hard pruning); pruned steps are neither computed nor cached, kept latent keys carry
  their log w as an additive key bias.

Rows of a batch are decoded one after another (exact; the packed multi-row compaction of
DESIGN.md "Halting-aware packing" is future work). Decoders record what they executed
(``activity``) for megaponder/models/flops.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import AttentionSpec
from .latent import LatentLM, PonderLM3
from .ponder import PonderLM

VERTICAL_HALTING = ("adaponderlm", "fixed_pruning", "random_halting")


def _cat(past, new):
    return new if past is None else torch.cat([past, new], dim=2)


class VerticalDecoder:
    """vanilla / ponderlm / adaponderlm / fixed_pruning / random_halting, one row."""

    def __init__(self, model, seed: int = 0):
        self.model = model
        self.passes = getattr(model, "num_passes", 1)
        self.adaptive = getattr(model, "adaptive", False)
        self.layers = len(model.stack.layers)
        self.caches = [[None] * self.layers for _ in range(self.passes)]  # (k, v) [1, H, Tc, D]
        self.tc = 0
        self.activity: list[torch.Tensor] = []  # per feed: [P, n] bool
        self.generator = torch.Generator().manual_seed(seed)

    def _embed(self, ids):
        m = self.model
        return m.input_embeddings(ids) if hasattr(m, "input_embeddings") else m.embed(ids)

    def _pass(self, i, e, pos, compute_idx, write_mask, chunk_prev):
        """Run iteration i on the rows ``compute_idx`` of the chunk; rows with write_mask write
        their new K/V, the others keep chunk_prev's (reuse)."""
        new_chunk = [None] * self.layers
        cache = self.caches[i]

        def hook(layer, k, v):
            if chunk_prev is None:
                ck, cv = k, v
            else:
                ck, cv = chunk_prev[layer][0].clone(), chunk_prev[layer][1].clone()
                w = write_mask[compute_idx]
                ck[:, :, compute_idx[w]] = k[:, :, w]
                cv[:, :, compute_idx[w]] = v[:, :, w]
            new_chunk[layer] = (ck, cv)
            past = cache[layer]
            if past is None:
                return ck, cv
            return _cat(past[0], ck), _cat(past[1], cv)

        spec = AttentionSpec(q_index=self.tc + compute_idx)
        hidden, _ = self.model.stack(e[:, compute_idx], pos[:, compute_idx], spec, kv_hook=hook)
        return hidden, new_chunk

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        m, P = self.model, self.passes
        n = ids.shape[1]
        dev = ids.device
        pos = torch.arange(self.tc, self.tc + n, device=dev).unsqueeze(0)
        e = self._embed(ids)
        readout = None
        active = torch.ones(n, dtype=torch.bool, device=dev)
        plan = None
        if self.adaptive and m.family in ("fixed_pruning", "random_halting"):
            u = torch.rand(n, generator=self.generator).to(dev)
            plan = m.threshold_plan(u)  # [P, n]
        final_readout = self.adaptive and m.ponder_cfg.halted_readout == "final"
        acts = [active.clone()]
        chunk_prev = None
        all_rows = torch.arange(n, device=dev)
        for i in range(P):
            last = i == P - 1
            compute_mask = active | (final_readout and last)
            compute_idx = all_rows[compute_mask]
            if compute_idx.numel() == 0:  # every row of the chunk has halted
                new_chunk = chunk_prev
                if not last:
                    acts.append(active.clone())
            else:
                hidden, new_chunk = self._pass(i, e, pos, compute_idx, active, chunk_prev)
                logits = m.head(hidden)
                if readout is None:
                    readout = torch.zeros(1, n, logits.shape[-1], dtype=logits.dtype, device=dev)
                # last_active: every active row's latest logits; final: the last pass for all
                readout[:, compute_idx] = logits
                if not last:
                    rows_act = compute_idx  # == active rows when not last
                    if plan is not None:
                        cont = plan[i + 1][rows_act]
                        s = None
                    else:
                        s = m.gate_values(i, hidden) if self.adaptive else None
                        cont = (s[0] >= m.ponder_cfg.tau) if s is not None else torch.ones_like(rows_act, dtype=torch.bool)
                    new_active = torch.zeros_like(active)
                    new_active[rows_act[cont]] = True
                    if cont.any():
                        upd = m.ponder_update(logits[:, cont])
                        w = s[:, cont].to(e.dtype).unsqueeze(-1) if s is not None else 1.0
                        e = e.clone()
                        e[:, rows_act[cont]] = e[:, rows_act[cont]] + w * upd
                    active = new_active
                    acts.append(active.clone())
            for layer in range(self.layers):
                past = self.caches[i][layer]
                k, v = new_chunk[layer]
                self.caches[i][layer] = (k, v) if past is None else (_cat(past[0], k), _cat(past[1], v))
            chunk_prev = new_chunk
        self.tc += n
        self.activity.append(torch.stack(acts))
        return readout

    def executed(self) -> torch.Tensor:
        return torch.cat(self.activity, dim=1)  # [P, T]


class LoopDecoder(VerticalDecoder):
    @torch.no_grad()
    def feed(self, ids):
        m = self.model
        n = ids.shape[1]
        pos = torch.arange(self.tc, self.tc + n, device=ids.device).unsqueeze(0)
        x = m.embed(ids)
        spec = AttentionSpec(q_index=torch.arange(self.tc, self.tc + n, device=ids.device))
        for i in range(self.passes):
            cache = self.caches[i]

            def hook(layer, k, v, cache=cache):
                past = cache[layer]
                cache[layer] = (k, v) if past is None else (_cat(past[0], k), _cat(past[1], v))
                return cache[layer]

            x, _ = m.stack(x, pos, spec, kv_hook=hook, apply_final_norm=False)
        self.tc += n
        self.activity.append(torch.ones(self.passes, n, dtype=torch.bool))
        return m.head(m.stack.final_norm(x))


class LatentDecoder:
    """ponderlm2 / ponderlm3 / pause, one row, token by token."""

    def __init__(self, model: LatentLM, seed: int = 0):
        self.model = model
        self.layers = len(model.stack.layers)
        self.cache = [None] * self.layers
        self.key_bias: Optional[torch.Tensor] = None  # [1, Tc] additive bias per cached key
        self.tc = 0
        self.steps_executed: list[int] = []
        self.is_p3 = isinstance(model, PonderLM3)
        self.tc_token = 0  # sequence position (token index) of the next token

    def _step(self, x, pos, new_bias, own):
        """One position through the stack with the cache; ``own`` = how many of the newest
        cached keys (this token's earlier steps) are the query's own."""
        m = self.model
        dev = x.device

        def hook(layer, k, v):
            past = self.cache[layer]
            self.cache[layer] = (k, v) if past is None else (_cat(past[0], k), _cat(past[1], v))
            return self.cache[layer]

        bias = None
        if self.is_p3:
            nb = torch.tensor([[new_bias]], dtype=torch.float32, device=dev)
            bias = nb if self.key_bias is None else torch.cat([self.key_bias, nb], dim=1)
            self.key_bias = bias
            if not m.ponder_cfg.bias_own_steps:
                bias = bias.clone()
                bias[:, -(own + 1):] = 0.0
            bias = bias.view(1, 1, 1, -1)
        spec = AttentionSpec(q_index=torch.tensor([self.tc], device=dev), key_bias=bias)
        hidden, _ = m.stack(x, pos, spec, kv_hook=hook)
        self.tc += 1
        return hidden

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        out = []
        for j in range(ids.shape[1]):
            tok = ids[:, j:j + 1]
            pos = torch.full((1, 1), self.tc_token, dtype=torch.long, device=ids.device)
            h = self._step(m.token_embeddings(tok), pos, 0.0, 0)
            hs = [h]
            if self.is_p3:
                s, log_w, keep = m.route(h[0, 0])
                n_steps = int(keep.sum())
            else:
                n_steps = m.num_stages
            for k in range(1, n_steps):
                if m.family == "pause":
                    x = m.pause_embedding.detach().to(h.dtype).view(1, 1, -1)
                else:
                    x = hs[-1]
                bias = float(log_w[k]) if self.is_p3 else 0.0
                hs.append(self._step(x, pos, bias, k))
            if self.is_p3:
                w = s[:n_steps]
                if m.ponder_cfg.renormalize_pruned:
                    w = w / w.sum()
                hmix = torch.einsum("btk,btkd->btd", w.to(h.dtype).view(1, 1, -1), torch.stack(hs, dim=2))
                out.append(m.head(hmix))
            else:
                out.append(m.head(hs[-1]))
            self.steps_executed.append(n_steps)
            self.tc_token += 1
        return torch.cat(out, dim=1)

    def executed(self) -> torch.Tensor:
        return torch.tensor(self.steps_executed, dtype=torch.float64)


def make_decoder(model, seed: int = 0):
    if isinstance(model, LatentLM):
        return LatentDecoder(model, seed)
    if getattr(model, "family", "vanilla") == "loop":
        return LoopDecoder(model, seed)
    return VerticalDecoder(model, seed)


@torch.no_grad()
def decode_logits(model, input_ids: torch.Tensor, chunk: Optional[int] = None, seed: int = 0,
                  return_decoders: bool = False):
    """Logits [B, T, V] of ``input_ids`` through the cached decoder, ``chunk`` tokens per
    ``feed`` call (None: the whole row at once, i.e. a compacted prefill)."""
    outs, decs = [], []
    for b in range(input_ids.shape[0]):
        dec = make_decoder(model, seed)
        row = input_ids[b:b + 1]
        step = chunk or row.shape[1]
        outs.append(torch.cat([dec.feed(row[:, s:s + step]) for s in range(0, row.shape[1], step)], dim=1))
        decs.append(dec)
    logits = torch.cat(outs, dim=0)
    return (logits, decs) if return_decoders else logits


@torch.no_grad()
def generate_cached(model, prompt_ids: list[int], max_new_tokens: int = 50, temperature: float = 1.0,
                    top_k: int = 0, vocab_size: Optional[int] = None, eos_id: Optional[int] = None,
                    seed: int = 0) -> list[int]:
    """Sampling with the family's cached decoder (used by megaponder.infer.generate)."""
    from ..infer import sample_next

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    dec = make_decoder(model, seed)
    logits = dec.feed(torch.tensor([prompt_ids], dtype=torch.long, device=dev))[0, -1].float()
    new: list[int] = []
    for _ in range(max_new_tokens):
        if vocab_size is not None:
            logits = logits[:vocab_size]
        nxt = sample_next(logits, temperature, top_k, generator)
        new.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        logits = dec.feed(torch.tensor([[nxt]], dtype=torch.long, device=dev))[0, -1].float()
    model.train(was_training)
    return new
