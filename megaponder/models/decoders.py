"""KV-cached incremental inference for every family (docs/families.md "Inference").

``make_decoder(model)`` returns a decoder; ``decoder.feed(ids)`` appends tokens ([B, n] for
the vertical families, [1, n] for the latent ones) and returns their logits ([B, n, V]); any
chunking of a sequence into ``feed`` calls gives the same logits as the model's training
forward (tests check 1e-5 fp32):

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

Vertical families decode a batch of rows in lockstep with cross-row compaction
(halting-aware packing, docs/families.md): each iteration runs the stack on the still-active tokens of all
rows packed left-aligned into one buffer; latent families decode row by row. Decoders record
what they executed (``activity``, and the padding the packing cost: ``computed_slots`` vs
``active_slots``) for megaponder/models/flops.py.

Which decoder a family uses is its FamilySpec's ``decoder`` (megaponder/models/spec.py); this
module imports no family module, so the families can name their decoder without a cycle.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import AttentionSpec
from .compaction import pack_rows
from .spec import family_spec, require


def _cat(past, new):
    return new if past is None else torch.cat([past, new], dim=2)


class VerticalDecoder:
    """vanilla / ponderlm / adaponderlm / fixed_pruning / random_halting, a batch of rows fed
    in lockstep ([B, n] per ``feed``).

    Cross-row compaction: at every iteration the tokens still active in *all* rows are packed
    left-aligned into one [B, A] buffer (A = the most active tokens of any row), the stack
    runs on that buffer only (queries: the packed tokens at their positions; keys: the row's
    whole cache, halted tokens from their reused K/V), and results are scattered back. Rows
    with fewer active tokens than A compute padding slots that are discarded
    (``computed_slots`` vs ``active_slots`` counts them)."""

    def __init__(self, model, seed: int = 0, prefill: str = "sequential"):
        self.model = model
        self.passes = getattr(model, "num_passes", 1)
        self.adaptive = getattr(model, "adaptive", False)
        self.layers = len(model.stack.layers)
        self.caches = [[None] * self.layers for _ in range(self.passes)]  # (k, v) [B, H, Tc, D]
        self.tc = 0
        self.activity: list[torch.Tensor] = []  # per feed: [P, B, n] bool
        self.computed_slots = 0   # query slots the stack ran (padding included)
        self.active_slots = 0     # of which belonged to tokens that needed them
        self.seed = seed

    def _pass(self, i, e, pos, idx, valid, active, chunk_prev):
        """Iteration i on the packed tokens ``idx`` ([B, A], ``valid`` slots real): the active
        ones write their new K/V into the chunk, all others keep chunk_prev's (reuse)."""
        new_chunk = [None] * self.layers
        cache = self.caches[i]
        rows, slots = (valid & active.gather(1, idx)).nonzero(as_tuple=True)  # writers
        tokens = idx[rows, slots]

        def written(prev, new):   # prev [B, H, n, D] with the active packed tokens of new
            out = prev.clone()
            out[rows, :, tokens] = new[rows, :, slots]
            return out

        def hook(layer, k, v):
            if chunk_prev is None:   # first iteration: every token computed, in order
                ck, cv = k, v
            else:
                ck, cv = written(chunk_prev[layer][0], k), written(chunk_prev[layer][1], v)
            new_chunk[layer] = (ck, cv)
            past = cache[layer]
            if past is None:
                return ck, cv
            return _cat(past[0], ck), _cat(past[1], cv)

        d = e.shape[-1]
        spec = AttentionSpec(q_index=self.tc + idx)
        hidden, _ = self.model.stack(e.gather(1, idx.unsqueeze(-1).expand(-1, -1, d)),
                                     pos.gather(1, idx), spec, kv_hook=hook)
        self.computed_slots += idx.numel()
        self.active_slots += int(valid.sum())
        return hidden, new_chunk

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        m, P = self.model, self.passes
        b, n = ids.shape
        dev = ids.device
        pos = torch.arange(self.tc, self.tc + n, device=dev).unsqueeze(0).expand(b, n)
        e = self.model.input_embeddings(ids)
        readout = None
        active = torch.ones(b, n, dtype=torch.bool, device=dev)
        plan = None
        if self.adaptive and family_spec(m.family).halting == "schedule":
            # the eval forward's draws for these tokens (stream = this decoder's seed)
            rows = torch.arange(b).view(-1, 1).expand(b, n)
            u = m.eval_uniforms(rows, pos.cpu(), self.seed, salt=2).to(dev)
            plan = m.threshold_plan(u)  # [P, B, n]
        final_readout = self.adaptive and m.ponder_cfg.halted_readout == "final"
        acts = [active.clone()]
        chunk_prev = None
        for i in range(P):
            last = i == P - 1
            compute_mask = active | (final_readout and last)
            if not compute_mask.any():  # every token of the batch has halted
                new_chunk = chunk_prev
                if not last:
                    acts.append(active.clone())
            else:
                idx, valid = pack_rows(compute_mask)  # the packing train_compaction uses
                hidden, new_chunk = self._pass(i, e, pos, idx, valid, active, chunk_prev)
                logits = m.head(hidden)   # [B, A, V]
                if readout is None:
                    readout = torch.zeros(b, n, logits.shape[-1], dtype=logits.dtype, device=dev)
                # last_active: every active token's latest logits; final: the last pass for all
                rows, slots = valid.nonzero(as_tuple=True)
                readout[rows, idx[rows, slots]] = logits[rows, slots]
                if not last:   # computed tokens == active tokens here
                    if plan is not None:
                        cont, s = plan[i + 1].gather(1, idx) & valid, None
                    elif self.adaptive:
                        s = m.gate_values(i, hidden)
                        cont = valid & (s >= m.ponder_cfg.tau)
                    else:
                        cont, s = valid, None
                    rows, slots = cont.nonzero(as_tuple=True)
                    tokens = idx[rows, slots]
                    new_active = torch.zeros_like(active)
                    new_active[rows, tokens] = True
                    if rows.numel():
                        upd = m.ponder_update(logits[rows, slots].unsqueeze(0))[0]
                        w = s[rows, slots].to(e.dtype).unsqueeze(-1) if s is not None else 1.0
                        e = e.clone()
                        e[rows, tokens] = e[rows, tokens] + w * upd
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
        return torch.cat(self.activity, dim=2)  # [P, B, T]

    def row(self, b: int) -> "_RowView":
        return _RowView(self, b)


class _RowView:
    """One row of a batched decoder, for per-sequence accounting (``executed()`` [P, T])."""

    def __init__(self, decoder, b: int):
        self.decoder, self.b = decoder, b

    def executed(self) -> torch.Tensor:
        return self.decoder.executed()[:, self.b]


class LoopDecoder(VerticalDecoder):
    @torch.no_grad()
    def feed(self, ids):
        m = self.model
        b, n = ids.shape
        pos = torch.arange(self.tc, self.tc + n, device=ids.device).unsqueeze(0).expand(b, n)
        x = m.input_embeddings(ids)
        spec = AttentionSpec(q_index=torch.arange(self.tc, self.tc + n, device=ids.device))
        for i in range(self.passes):
            cache = self.caches[i]

            def hook(layer, k, v, cache=cache):
                past = cache[layer]
                cache[layer] = (k, v) if past is None else (_cat(past[0], k), _cat(past[1], v))
                return cache[layer]

            x, _ = m.stack(x, pos, spec, kv_hook=hook, apply_final_norm=False)
        self.tc += n
        self.computed_slots += self.passes * b * n
        self.active_slots += self.passes * b * n
        self.activity.append(torch.ones(self.passes, b, n, dtype=torch.bool))
        return m.head(m.stack.final_norm(x))


class LatentDecoder:
    """ponderlm2 / ponderlm3 / pause, one row, token by token."""

    def __init__(self, model, seed: int = 0, prefill: str = "sequential"):
        if prefill not in ("sequential", "jacobi"):
            raise ValueError(f"prefill must be 'sequential' or 'jacobi', got '{prefill}'")
        self.model = model
        self.prefill = prefill
        self.layers = len(model.stack.layers)
        self.cache = [None] * self.layers
        self.key_bias: Optional[torch.Tensor] = None  # [1, Tc] additive bias per cached key
        self.tc = 0
        self.steps_executed: list[int] = []
        self.is_p3 = family_spec(model.family).halting == "router"
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
    def jacobi_prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The official inference path for a prompt: the parallel forward (build-up, Jacobi to
        ``ponder.eval_jacobi_tol`` in eval_mode exact, final pass) over all its tokens at once,
        whose final pass fills the cache (PonderLM-3: only the kept steps and their log w).
        Equal to the sequential prefill up to the Jacobi tolerance (tests/test_fidelity.py)."""
        m = self.model
        was_training = m.training
        m.eval()
        try:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            hidden, state, _, kvs = m.latent_forward(ids, pos, None, None)
            valid = torch.ones_like(ids, dtype=torch.bool)
            logits = m.readout(hidden, state, valid)[0]
        finally:
            m.train(was_training)
        t, n = ids.shape[1], self.model.num_stages
        if self.is_p3:
            _, log_w, keep = state
            kept = keep[0].flatten().nonzero(as_tuple=True)[0]   # interleaved key slots kept
            self.key_bias = log_w[0].flatten()[kept].float().unsqueeze(0)
            self.steps_executed += keep[0].sum(-1).int().tolist()
        else:
            kept = torch.arange(t * n, device=ids.device)
            self.steps_executed += [n] * t
        self.cache = [(k[:, :, kept], v[:, :, kept]) for k, v in kvs]
        self.tc, self.tc_token = int(kept.numel()), t
        return logits

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        if (self.prefill == "jacobi" and self.tc == 0 and ids.shape[1] > 1
                and family_spec(m.family).jacobi):
            return self.jacobi_prefill(ids)
        out = []
        for j in range(ids.shape[1]):
            tok = ids[:, j:j + 1]
            pos = torch.full((1, 1), self.tc_token, dtype=torch.long, device=ids.device)
            h = self._step(m.input_embeddings(tok), pos, 0.0, 0)
            hs = [h]
            if self.is_p3:
                s, log_w, keep = m.route(h[0, 0])
                n_steps = int(keep.sum())
            else:
                n_steps = m.num_stages
            for k in range(1, n_steps):
                x = m.stage_input(hs[-1])
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


def make_decoder(model, seed: int = 0, prefill: str = "sequential"):
    """``prefill``: latent families' first multi-token feed — 'sequential' (token by token,
    exact) or 'jacobi' (the parallel forward, exact to the Jacobi tolerance). The decoder is
    the one the family's spec declares; a family without one is an error."""
    return require(model.family, "decoder")(model, seed, prefill)


@torch.no_grad()
def decode_logits(model, input_ids: torch.Tensor, chunk: Optional[int] = None, seed: int = 0,
                  return_decoders: bool = False, prefill: str = "sequential"):
    """Logits [B, T, V] of ``input_ids`` through the cached decoder, ``chunk`` tokens per
    ``feed`` call (None: the whole row at once, i.e. a compacted prefill). Vertical families
    decode all rows in lockstep with cross-row compaction; latent families row by row.
    ``return_decoders``: also one object per row whose ``executed()`` is its activity."""
    step = chunk or input_ids.shape[1]
    if family_spec(model.family).kind == "latent":
        outs, rows = [], []
        for b in range(input_ids.shape[0]):
            dec = make_decoder(model, seed, prefill)
            row = input_ids[b:b + 1]
            outs.append(torch.cat([dec.feed(row[:, s:s + step]) for s in range(0, row.shape[1], step)], dim=1))
            rows.append(dec)
        logits = torch.cat(outs, dim=0)
    else:
        dec = make_decoder(model, seed)
        logits = torch.cat([dec.feed(input_ids[:, s:s + step])
                            for s in range(0, input_ids.shape[1], step)], dim=1)
        rows = [dec.row(b) for b in range(input_ids.shape[0])]
    return (logits, rows) if return_decoders else logits


@torch.no_grad()
def generate_cached(model, prompt_ids: list[int], max_new_tokens: int = 50, temperature: float = 1.0,
                    top_k: int = 0, vocab_size: Optional[int] = None, eos_id: Optional[int] = None,
                    seed: int = 0, static_cache: bool = False, compile: bool = False) -> list[int]:
    """Sampling with the family's cached decoder (used by megaponder.infer.generate);
    ``static_cache``: its static-shape decoder (``compile``: compiled step; implies it)."""
    from .sampling import sample_next

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    if static_cache or compile:
        from .static_cache import cache_length, make_static_decoder
        dec = make_static_decoder(model, 1, cache_length(len(prompt_ids) + max_new_tokens, compile),
                                  seed, compile)
    else:
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
