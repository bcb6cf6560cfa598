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

    The cache: per layer one K and one V buffer ``[P, B + 1, H_kv, capacity, D]`` (all passes
    of the layer in one tensor, so KV reuse of a whole batch is one copy; row B is a scratch
    row, see below), written in place at each token's slot and grown by doubling, so a token
    costs no ``torch.cat`` of the whole cache.

    A multi-token feed (a prompt, a chunk) uses cross-row compaction: at every iteration the
    tokens still active in *all* rows are packed left-aligned into one [B, A] buffer (A = the
    most active tokens of any row), the stack runs on that buffer only (queries: the packed
    tokens at their positions; keys: the row's whole cache, halted tokens from their reused
    K/V), and results are scattered back. Rows with fewer active tokens than A compute
    padding slots that are discarded (``computed_slots`` vs ``active_slots`` counts them).
    It reads the active counts on the host at every pass (its shapes are those counts).

    A one-token feed (generation) runs :meth:`_feed_token`: pass 0 on every row, then ONE host
    read (how many rows go on pondering) and passes 1..P-1 on those rows only, padded to a
    power of two ("bucket": at most log2(B) + 1 shapes; the padding rows point at the scratch
    row, whose results are discarded); a row that halts inside the bucket keeps its K/V,
    logits and embedding by ``where``, as the static-shape decoder does. When no row
    continues, passes 1..P-1 are skipped, their K/V copied from pass 0."""

    def __init__(self, model, seed: int = 0, prefill: str = "sequential"):
        self.model = model
        self.passes = getattr(model, "num_passes", 1)
        self.adaptive = getattr(model, "adaptive", False)
        self.scheduled = self.adaptive and family_spec(model.family).halting == "schedule"
        self.final_readout = self.adaptive and model.ponder_cfg.halted_readout == "final"
        self.layers = len(model.stack.layers)
        self.kv: Optional[list] = None   # per layer (K, V) [P, B + 1, H_kv, capacity, D]
        self.batch = 0
        self.tc = 0
        self.activity: list[torch.Tensor] = []  # per feed: [P, B, n] bool
        self.computed_slots = 0   # query slots the stack ran (padding included)
        self.seed = seed
        #: the batch row each row draws the schedule baselines' halting plan as (None: its
        #: own index); a one-row decoder prefilling row b of a batch sets [b]
        self.draw_rows: Optional[torch.Tensor] = None

    # -- the cache ------------------------------------------------------------------------
    def _reserve(self, batch: int, length: int, like: torch.Tensor) -> None:
        """Room for ``length`` tokens of ``batch`` rows; grows by doubling (a token costs an
        amortized O(1) copy of the cache, not the O(T) of a concatenation)."""
        if self.kv is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(f"decoder was fed {self.batch} rows before, now {batch}")
        have = 0 if self.kv is None else self.kv[0][0].shape[3]
        if length <= have:
            return
        attn = self.model.stack.layers[0].attn
        heads = getattr(attn, "num_kv_heads", attn.num_heads)
        shape = (self.passes, batch + 1, heads, max(64, length, 2 * have), attn.head_dim)
        kv = [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(self.layers)]
        if self.kv is not None:
            for new, old in zip(kv, self.kv):
                for n_buf, o_buf in zip(new, old):
                    n_buf[:, :, :, :self.tc].copy_(o_buf[:, :, :, :self.tc])
        self.kv = kv

    def _draw_rows(self, batch: int, device) -> torch.Tensor:
        return torch.arange(batch, device=device) if self.draw_rows is None else self.draw_rows.to(device)

    @property
    def caches(self) -> list:
        """[pass][layer] (k, v) [B, H_kv, T, D]: views of every cached token's keys/values."""
        if self.kv is None or self.tc == 0:
            return [[None] * self.layers for _ in range(self.passes)]
        b, t = self.batch, self.tc
        return [[(k[i, :b, :, :t], v[i, :b, :, :t]) for k, v in self.kv] for i in range(self.passes)]

    @property
    def active_slots(self) -> int:
        """Pass-token slots that belonged to active tokens (counted on demand: no host read
        per step)."""
        return int(self.executed().sum()) if self.activity else 0

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        self._reserve(b, self.tc + n, next(self.model.parameters()))
        readout, acts = self._feed_token(ids) if n == 1 else self._feed_chunk(ids)
        self.tc += n
        self.activity.append(acts)
        return readout

    # -- one token per row: the generation step ------------------------------------------
    def _token_pass(self, i, x, pos, rows, active):
        """Pass i of a one-token step for the batch rows ``rows`` ([R] indices; B is the
        scratch row; None: all B rows in order) with inputs ``x`` [R, 1, d]: writes their K/V
        at the token's slot (a row not ``active`` ([R] bool; None: all are) keeps pass i-1's,
        KV reuse) and attends to each row's whole cache. Returns the final-norm hidden."""
        slot, b = self.tc, self.batch

        def hook(layer, k, v):
            out = []
            for buf, new in zip(self.kv[layer], (k, v)):
                if rows is None:
                    if active is not None:
                        new = torch.where(active.view(-1, 1, 1, 1), new, buf[i - 1, :b, :, slot:slot + 1])
                    buf[i, :b, :, slot:slot + 1] = new
                    out.append(buf[i, :b, :, :slot + 1])
                else:
                    if active is not None:
                        prev = buf[i - 1, :, :, slot].index_select(0, rows).unsqueeze(2)
                        new = torch.where(active.view(-1, 1, 1, 1), new, prev)
                    buf[i, :, :, slot].index_copy_(0, rows, new.squeeze(2))
                    out.append(buf[i, :, :, :slot + 1].index_select(0, rows))
            return out[0], out[1]

        # AttentionSpec(): one query at the end of its row's keys sees all of them (no mask)
        hidden, _ = self.model.stack(x, pos, AttentionSpec(), kv_hook=hook)
        return hidden

    #: rows of passes 1..P-1 of a one-token step: ``None`` picks by device (CUDA: the active
    #: count rounded up to a power of two, so the step takes at most log2(B) + 1 shapes, as
    #: the caching allocator and CUDA graphs want; CPU: the exact count, since a padding row
    #: costs its full share of a small matmul there); True / False force either
    pad_to_power_of_two: Optional[bool] = None
    #: on CPU, gather the continuing rows only when they are at most this fraction of the
    #: batch; more, and all B rows run (the halted ones by ``where``): a one-token pass over
    #: M rows streams every weight whatever M is, so 5-7 rows of 8 cost as much as 8 and the
    #: gathers would be pure overhead (benchmarks/bench_decode.py prints the measured curve)
    compact_fraction: float = 0.5

    def _bucket(self, count: int, batch: int, device) -> int:
        """Rows passes 1..P-1 run on (``batch``: all, no gathers)."""
        pad = self.pad_to_power_of_two
        if pad is None:
            pad = device.type == "cuda"
        if pad:
            return min(batch, 1 << (count - 1).bit_length())
        return count if count <= self.compact_fraction * batch else batch

    def _feed_token(self, ids: torch.Tensor):
        """One token per row; at most one host read (adaptive families), none otherwise."""
        m, P, b = self.model, self.passes, ids.shape[0]
        dev = ids.device
        pos = torch.full((b, 1), self.tc, dtype=torch.long, device=dev)
        e = m.input_embeddings(ids)
        hidden = self._token_pass(0, e, pos, None, None)
        logits = m.head(hidden)
        self.computed_slots += P * b if not self.adaptive else b
        ones = torch.ones(P, b, 1, dtype=torch.bool, device=dev)
        if not self.adaptive or P == 1:   # every pass for every row (PonderLM), or one pass
            for i in range(1, P):
                e = e + m.ponder_update(logits)
                logits = m.head(self._token_pass(i, e, pos, None, None))
            return logits, ones
        tau = m.ponder_cfg.tau
        plan = s = None
        if self.scheduled:   # the eval forward's draws for these tokens (stream = seed)
            rows_b = self._draw_rows(b, dev).view(-1, 1)
            plan = m.threshold_plan(m.eval_uniforms(rows_b, pos, self.seed, salt=2)).view(P, b)
            cont = plan[1]
        else:
            s = m.gate_values(0, hidden).view(b)
            cont = s >= tau
        n_cont = int(cont.sum())   # the step's one host read: how many rows go on pondering
        bucket = self._bucket(n_cont, b, dev) if n_cont else 0
        if bucket < b:   # rows left out keep pass 0's K/V in every later pass (KV reuse)
            for k, v in self.kv:
                k[1:, :, :, self.tc].copy_(k[0, :, :, self.tc])
                v[1:, :, :, self.tc].copy_(v[0, :, :, self.tc])
        later = torch.zeros(P - 1, b + 1, dtype=torch.bool, device=dev)   # activity of passes 1..P-1
        readout = logits
        last_bucket_pass = P - 2 if self.final_readout else P - 1   # passes run on the bucket
        x = active = rows = None
        if n_cont:
            if bucket == b:   # every row runs (the halted ones by where): plain slices, no gathers
                rows, take, active = None, slice(None), cont
            else:
                rows = torch.nonzero_static(cont, size=bucket, fill_value=b).view(-1)   # padding: b
                take = rows.clamp_max(b - 1)   # a padding row computes on a real row's inputs
                active = rows < b
            pos_r = pos[:bucket]
            lg = logits[take]
            upd = m.ponder_update(lg)
            if s is not None:
                upd = s[take].to(e.dtype).view(-1, 1, 1) * upd
            x = e[take] + upd if rows is not None else torch.where(cont.view(-1, 1, 1), e + upd, e)
            sub_acts = []
            for i in range(1, last_bucket_pass + 1):
                # pass 1 of gathered rows: all continue; of all rows: the halted ones reuse K/V
                hidden = self._token_pass(i, x, pos_r, rows, active if i > 1 or rows is None else None)
                new_lg = m.head(hidden)
                lg = torch.where(active.view(-1, 1, 1), new_lg, lg)   # last_active readout
                sub_acts.append(active)
                self.computed_slots += bucket
                if i == P - 1:
                    break
                if plan is not None:
                    nxt = active & plan[i + 1][take]
                    upd = m.ponder_update(new_lg)
                else:
                    s_i = m.gate_values(i, hidden).view(-1)
                    nxt = active & (s_i >= tau)
                    upd = s_i.to(e.dtype).view(-1, 1, 1) * m.ponder_update(new_lg)
                x = torch.where(nxt.view(-1, 1, 1), x + upd, x)
                active = nxt
            if sub_acts and rows is None:
                later[:len(sub_acts), :b] = torch.stack(sub_acts)
                readout = lg
            elif sub_acts:
                later[:len(sub_acts)].index_copy_(1, rows, torch.stack(sub_acts))
                readout = torch.cat([logits, logits[:1]]).index_copy(0, rows, lg)[:b]
        if self.final_readout:   # the last pass reads every row (halted ones on reused K/V)
            if n_cont and rows is None:
                later[P - 2, :b] = active
            elif n_cont:
                later[P - 2].index_copy_(0, rows, active)
                x = torch.cat([e, e[:1]]).index_copy(0, rows, x)[:b]
            else:
                x = e
            readout = m.head(self._token_pass(P - 1, x, pos, None, later[P - 2, :b]))
            self.computed_slots += b
        acts = torch.cat([ones[:1, :, 0], later[:, :b]]).unsqueeze(-1)
        return readout, acts
    # -- several tokens per row: prompts and chunks ---------------------------------------
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
        return hidden, new_chunk

    def _feed_chunk(self, ids: torch.Tensor):
        m, P = self.model, self.passes
        b, n = ids.shape
        dev = ids.device
        pos = torch.arange(self.tc, self.tc + n, device=dev).unsqueeze(0).expand(b, n)
        e = self.model.input_embeddings(ids)
        readout = None
        active = torch.ones(b, n, dtype=torch.bool, device=dev)
        plan = None
        if self.scheduled:   # the eval forward's draws for these tokens (stream = this decoder's seed)
            rows = self._draw_rows(b, dev).view(-1, 1).expand(b, n)
            plan = m.threshold_plan(m.eval_uniforms(rows, pos, self.seed, salt=2))  # [P, B, n]
        final_readout = self.final_readout
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
            for layer, (k_buf, v_buf) in enumerate(self.kv):   # the chunk into the cache
                k_buf[i, :b, :, self.tc:self.tc + n] = new_chunk[layer][0]
                v_buf[i, :b, :, self.tc:self.tc + n] = new_chunk[layer][1]
            chunk_prev = new_chunk
        return readout, torch.stack(acts)

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
    """loop: every pass for every token, each pass's K/V in its slice of the cache."""

    @torch.no_grad()
    def feed(self, ids):
        m = self.model
        b, n = ids.shape
        self._reserve(b, self.tc + n, next(m.parameters()))
        start, end = self.tc, self.tc + n
        pos = torch.arange(start, end, device=ids.device).unsqueeze(0).expand(b, n)
        x = m.input_embeddings(ids)
        spec = AttentionSpec()   # causal, the queries the last n keys
        for i in range(self.passes):
            def hook(layer, k, v, i=i):
                k_buf, v_buf = self.kv[layer]
                k_buf[i, :b, :, start:end] = k
                v_buf[i, :b, :, start:end] = v
                return k_buf[i, :b, :, :end], v_buf[i, :b, :, :end]

            x, _ = m.stack(x, pos, spec, kv_hook=hook, apply_final_norm=False)
        self.tc = end
        self.computed_slots += self.passes * b * n
        self.activity.append(torch.ones(self.passes, b, n, dtype=torch.bool, device=ids.device))
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
        if self.is_p3:   # new_bias: a float or a device scalar (no host read of log w)
            nb = torch.as_tensor(new_bias, dtype=torch.float32, device=dev).view(1, 1)
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
                n_steps = int(keep.sum())   # the token's one host read: how many steps run
            else:
                n_steps = m.num_stages
            for k in range(1, n_steps):
                x = m.stage_input(hs[-1])
                bias = log_w[k] if self.is_p3 else 0.0
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
