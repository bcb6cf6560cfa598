"""Depth-staggered decoding: halting that saves time in token-by-token batched generation.

In a vertical pondering family (AdaPonderLM, PonderLM, the schedule baselines, vanilla) every
pass runs the same stack, so a batch step need not keep its rows at the same pass. This
decoder lets each row of the batch move through its own (token, pass) sequence: one **tick**
runs the stack once, one token per row, each row at *its* pass of *its* current token. A row
whose token halts after pass p starts its next token at the next tick, while its neighbours
are still pondering; no tick computes a slot that halting skipped, and the batch never waits
for its slowest row. (Continuous batching over depth, the idea Geiping et al. 2025 describe for
recurrent-depth models.) The compacting decoder (decoders.py) instead keeps the batch in
lockstep: a token costs every row the deepest row's passes, or host reads to find who halted.

What a tick does, per row b at pass p of the token in cache slot t (all on the device, no host
read off CPU; the shapes never change, so the step is one static graph):

* writes the token's K/V of pass p into slot t of passes p..P-1: a token that halts here leaves
  its last active K/V in every later pass (the KV reuse of decoders.py); a token that goes on
  overwrites them at the next tick;
* attends, at pass p, to slots 0..t of its own row (``AttentionSpec(q_index=t)``; rows sit at
  different slots, so the keys are each row's own pass-p cache gathered per row);
* decides as the lockstep decoders do: the gate s^p >= tau (AdaPonderLM; every gate for every
  row in one matmul per gate layer, or on CPU the gates of the deciding rows' range of passes,
  ``gates_in_range``), the eval-time halting plan (schedule baselines), or every pass
  (PonderLM). A row that goes on adds the pondering update to its input; a row that halts
  emits the logits of this pass (``halted_readout: last_active``) or, for ``final``, spends
  one more tick at pass P-1 on the reused K/V without writing, as the lockstep decoder
  computes its final readout;
* a row whose token is done takes its next token (``next_token``: the sampler, or the next id of
  a given sequence) as the input of pass 0 in the next slot.

The logits of every token equal the lockstep decoder's (tests/test_staggered_decode.py, 1e-5 in
fp32: the same ops, the attention over a masked, longer key range). The host reads the device
to know when every row is done, once per round of ``ticks_per_read`` ticks, and on CPU (where
a read stalls nothing) which passes decide, once per tick; there, rows that are done leave
the ticks at the round's read (``drop_finished_rows``).
Rows whose prompts differ in length need no padding: each row's positions are its own slots
(a row with an empty prompt starts at slot 0).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .attention import AttentionSpec
from .decoders import VerticalDecoder
from .sampling import sample_rows
from .spec import family_spec, require

#: next_token(logits [R, V], tokens_done [R], rows [R]) -> the next input id of each of the R
#: rows the tick ran [R]; ``rows``: their batch indices (all B, or the unfinished ones once
#: ``drop_finished_rows`` has dropped the rest)
NextToken = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def supports_staggered(model) -> bool:
    """Whether the family decodes with VerticalDecoder: every pass the same stack, so rows
    can sit at different passes (loop's passes differ; latent families interleave steps)."""
    return require(model.family, "decoder") is VerticalDecoder


class StaggeredDecoder:
    """Batched token-by-token decoding of a vertical family with each row at its own pass.

    ``prefill(prompts, steps)`` runs the prompts through the lockstep decoder (one compacted
    batch when they have one length, row by row otherwise) and returns each row's last logits
    [B, V]; ``decode(first, steps, next_token)`` then feeds ``first`` [B] and ``steps - 1``
    more tokens per row (each chosen by ``next_token`` from the previous token's logits) and
    returns the ``steps`` tokens fed plus the token chosen after the last one ([B, steps + 1];
    after a row's ``stop_id`` the row holds ``stop_id``), and with ``keep_logits`` the logits
    of every fed token [B, steps, V]. ``executed()`` is the [P, B, steps] activity of the fed
    tokens; ``computed_slots`` counts the (pass, token) slots the ticks ran (one per row a
    tick ran), ``active_slots`` those that were active. After ``prefill`` of prompts of one length,
    ``prompt_decoder`` is the lockstep decoder holding them (None otherwise) and
    ``prompt_activity()`` the fraction of the prompts' (pass, token) slots that were active.
    A prompt may be empty (``prefill``); ``draw_rows`` picks the schedule baselines' plan rows."""

    #: ticks between two host reads (of whether every row is done and of the longest row,
    #: which bounds the keys attended): a read is a pipeline stall on a GPU, a longer round
    #: attends to more masked keys
    ticks_per_read: int = 8
    #: AdaPonderLM's gates per tick: ``False``: every iteration's gate for every row (one
    #: matmul per gate layer, no host read); ``True``: only the gates from the lowest to the
    #: highest pass a deciding row sits at (a slice of the same weights), at the price of one
    #: host read per tick of those two passes; ``None``: True on CPU, where reading a CPU
    #: tensor stalls nothing (CPU ops run synchronously) and a small-batch matmul costs what
    #: streaming its weights costs, False elsewhere
    gates_in_range: Optional[bool] = None
    #: rows whose tokens are all done leave the ticks at the next round's host read (the
    #: tick's shapes shrink): ``None``: on CPU only, where a pass over fewer rows costs less
    #: (benchmarks/bench_decode.py prints the curve) and the round's read is free; on an
    #: accelerator a small batch's tick costs the same whatever its rows, and fixed shapes
    #: keep it one static graph
    drop_finished_rows: Optional[bool] = None

    def __init__(self, model, seed: int = 0):
        if not supports_staggered(model):
            raise ValueError(f"staggered decoding needs a family whose passes share one stack "
                             f"(decoder VerticalDecoder); '{model.family}' decodes with "
                             f"{require(model.family, 'decoder').__name__}: use make_decoder")
        spec = family_spec(model.family)
        self.model, self.seed = model, seed
        self.passes = getattr(model, "num_passes", 1)
        adaptive = getattr(model, "adaptive", False)
        self.gated = adaptive and spec.halting == "gate"
        self.scheduled = adaptive and spec.halting == "schedule"
        self.final_readout = adaptive and model.ponder_cfg.halted_readout == "final"
        self.gates = model.every_gate() if self.gated else None
        self.kv: Optional[list] = None   # per layer [B * P + 1, 2, H_kv, capacity, D]
        self._prompt_parts: Optional[list] = None   # (lockstep decoder, its row, our row)
        self.computed_slots = 0
        self.acts: Optional[torch.Tensor] = None
        #: the batch row each row draws the schedule baselines' halting plan as [B] (None: its
        #: own index, as an unpadded batch); zeros: every row draws as a lone row (the plan of
        #: a one-row decoder, as the Hugging Face export's per-row path). Set before prefill().
        self.draw_rows: Optional[torch.Tensor] = None

    # -- the prompts ----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Union[torch.Tensor, Sequence[torch.Tensor]], steps: int) -> torch.Tensor:
        """Fill the cache with the prompts ([B, T] ids, or B 1-D id tensors of any lengths)
        and make room for ``steps`` more tokens per row; returns the last logits [B, V].

        A prompt may be empty (some rows or all): its row starts with an empty cache, its
        first decoded token at slot (position) 0; its row of the returned logits is NaN (there
        is no last token), so a caller that picks from it gets no silent token."""
        rows = list(prompts) if not torch.is_tensor(prompts) else list(prompts.unbind(0))
        lengths = [int(r.numel()) for r in rows]
        batch = len(rows)
        draw = torch.arange(batch) if self.draw_rows is None else self.draw_rows.cpu().view(-1)
        if draw.numel() != batch:
            raise ValueError(f"StaggeredDecoder.draw_rows has {draw.numel()} rows, the prompts {batch}")
        same = len(set(lengths)) == 1 and lengths[0] > 0
        self.prompt_decoder = None
        if same:   # one compacted batch: row b draws the schedule plan of batch row draw[b]
            dec = VerticalDecoder(self.model, self.seed)
            dec.draw_rows = self.draw_rows
            last = dec.feed(torch.stack(rows))[:, -1]
            parts = [(dec, b, b) for b in range(batch)]
            self.prompt_decoder = dec   # can go on decoding in lockstep (generate_batched)
        else:      # row by row, each drawing as row draw[b] (the plan of an unpadded batch)
            like = next(self.model.parameters())
            parts, last = [], like.new_full((batch, self.model.cfg.vocab_size), float("nan"))
            for b, row in enumerate(rows):
                if lengths[b] == 0:   # nothing to prefill: an empty cache, NaN logits
                    continue
                dec = VerticalDecoder(self.model, self.seed)
                dec.draw_rows = draw[b:b + 1]
                last[b] = dec.feed(row.view(1, -1))[0, -1]
                parts.append((dec, 0, b))
        self._prompt_decoders = list(dict.fromkeys(dec for dec, _, _ in parts))
        self._prompt_parts = parts   # copied into this decoder's cache by the first decode()
        self._prompt_lengths = lengths
        self.kv, self.acts = None, None
        self.batch, self.capacity, self.longest = batch, max(lengths) + steps, max(lengths)
        dev = last.device
        self.length = torch.tensor(lengths, device=dev)
        self.rows = torch.arange(self.batch, device=dev)
        self.plan_rows = draw.to(dev)   # the batch row each row draws its halting plan as
        self.pass_ids = torch.arange(self.passes, device=dev)
        return last

    def prompt_activity(self) -> float:
        """Fraction of the prompts' (pass, token) slots that were active (one host read; NaN
        when no prompt has a token)."""
        executed = [dec.executed() for dec in self._prompt_decoders]
        if not executed:
            return float("nan")
        return float(torch.stack([e.sum() for e in executed]).sum()) / sum(e.numel() for e in executed)

    def _adopt_prompt_cache(self) -> None:
        """This decoder's cache from the lockstep decoders that prefilled the prompts: done at
        the first decode(), so a caller that goes on in lockstep (generate_batched) never
        allocates it. Per layer one buffer [B * P + 1, 2, H, capacity, D] of keys (index 0 of
        dim 1) and values (1): block b * P + q holds row b's pass q (a row's passes side by
        side, so the keys and values of every row at its own pass are one index_select of
        whole blocks); the last block is scratch for discarded writes."""
        parts, self._prompt_parts = self._prompt_parts, None
        attn = self.model.stack.layers[0].attn   # the shapes VerticalDecoder's cache has
        passes, heads, dim = self.passes, getattr(attn, "num_kv_heads", attn.num_heads), attn.head_dim
        like = next(self.model.parameters())
        blocks = self.batch * passes + 1
        self.kv = [like.new_zeros(blocks, 2, heads, self.capacity, dim) for _ in self.model.stack.layers]
        for dec, src, dst in parts:   # the prompt's K/V of every pass (halted tokens: reused ones)
            n = self._prompt_lengths[dst]
            for mine, (k, v) in zip(self.kv, dec.kv):
                mine[dst * passes:(dst + 1) * passes, 0, :, :n] = k[:, src, :, :n]
                mine[dst * passes:(dst + 1) * passes, 1, :, :n] = v[:, src, :, :n]
        # where a tick writes row b's K/V of pass q, as rows of the [blocks * 2H * capacity, D]
        # view (plus the token's slot): [B, P, 2H]; and the scratch block's [2H]
        lanes = torch.arange(2 * heads, device=like.device)
        self.write_at = ((self.rows.view(-1, 1, 1) * passes + self.pass_ids.view(1, -1, 1)) * 2 * heads
                         + lanes) * self.capacity
        self.scratch_at = ((blocks - 1) * 2 * heads + lanes) * self.capacity

    # -- the ticks ------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, first: torch.Tensor, steps: int, next_token: NextToken,
               stop_id: Optional[int] = None, keep_logits: bool = False):
        if self.kv is None and self._prompt_parts is None:
            raise RuntimeError("StaggeredDecoder.decode() before prefill()")
        if self.acts is not None:   # the cache, slots and (CPU) the rows are this decode's own
            raise RuntimeError("StaggeredDecoder.decode() runs once per prefill(): prefill() again")
        if self.kv is None:
            self._adopt_prompt_cache()
        if steps < 1 or self.longest + steps > self.capacity:
            raise ValueError(f"decode(): steps must lie in [1, {self.capacity - self.longest}] "
                             f"(the room prefill() made), got {steps}")
        m, b, dev = self.model, self.batch, self.length.device
        self.steps = steps
        self.count = torch.zeros(b, dtype=torch.long, device=dev)   # tokens of the row done
        self.pass_idx = torch.zeros(b, dtype=torch.long, device=dev)
        self.rereading = torch.zeros(b, dtype=torch.bool, device=dev)   # final readout pass
        first = first.to(dev).view(b)
        self.x = m.input_embeddings(first.view(b, 1))
        self.acts = torch.zeros(self.passes, b, steps + 1, dtype=torch.bool, device=dev)
        self.tokens = torch.full((b, steps + 2), -1 if stop_id is None else stop_id,
                                 dtype=torch.long, device=dev)   # column steps + 1: scratch
        self.tokens[:, 0] = first
        self.logits = None
        if keep_logits:
            self.logits = torch.zeros(b, steps + 1, m.cfg.vocab_size, device=dev)
        if stop_id is not None:   # a row whose first token is the stop token is done
            self.count = torch.where(first == stop_id, steps, self.count)
        self.positions = torch.arange(b, device=dev)   # the tick's rows, 0..R-1
        on_cpu = dev.type == "cpu"   # the device defaults of the two policies
        self._in_range = on_cpu if self.gates_in_range is None else self.gates_in_range
        drop = on_cpu if self.drop_finished_rows is None else self.drop_finished_rows
        ticks, left, most_done = 0, steps, 0
        while left > 0:   # left: a lower bound on the ticks the slowest row still needs
            for j in range(min(left, self.ticks_per_read)):
                # keys: every row's slot is at most longest + most_done + j (one token a tick)
                self._tick(min(self.capacity, self.longest + most_done + j + 1), next_token, stop_id)
                ticks += 1
            # the host read of a round: is every row done, how far has the furthest got (and,
            # dropping finished rows, which rows are done)
            read = torch.stack([(steps - self.count).max(), self.count.max()])
            left, most_done, *counts = (torch.cat([read, self.count]) if drop else read).tolist()
            if drop and left > 0 and max(counts) >= steps:   # some rows are done, not all
                self._keep_rows(torch.tensor([i for i, c in enumerate(counts) if c < steps], device=dev))
        self.ticks = ticks
        out = self.tokens[:, :steps + 1]
        return (out, self.logits[:, :steps]) if keep_logits else out

    def _keep_rows(self, keep: torch.Tensor) -> None:
        """Go on with the tick rows ``keep`` only (positions among the current ones): the
        per-row state shrinks; the cache, the tokens and the activity stay indexed by batch
        row (``self.rows``), so nothing else moves."""
        for name in ("count", "pass_idx", "rereading", "length", "x", "rows", "plan_rows", "write_at"):
            setattr(self, name, getattr(self, name).index_select(0, keep))
        self.positions = torch.arange(keep.numel(), device=keep.device)

    def _tick(self, keys: int, next_token: NextToken, stop_id: Optional[int]) -> None:
        """One stack pass, one token per row, each row at its own pass (module docstring).
        ``keys``: cache slots attended (a host bound on every row's current slot + 1).
        ``rows``: the batch row of each tick row (cache blocks, tokens, activity);
        ``at_row``: the tick rows' own positions 0..R-1 (their gates, plans)."""
        m, P, rows, at_row = self.model, self.passes, self.rows, self.positions
        b = rows.numel()
        live = self.count < self.steps
        col = self.count.clamp_max(self.steps)   # the token's column; done rows: scratch
        slot = (self.length + self.count).clamp_max(self.capacity - 1)
        p = self.pass_idx
        writing = live & ~self.rereading   # a re-reading row (final readout) and a done row write nothing
        # passes that take this K/V: p..P-1 (a token halting here keeps it in later passes)
        into = (self.pass_ids.view(1, P) >= p.view(b, 1)) & writing.view(b, 1)
        # where row b's K/V goes, as rows of the [blocks * 2H * capacity, D] view (one
        # index_copy_ of whole rows): blocks b * P + q of passes q >= p; the others (and rows
        # that write nothing) into the scratch block B * P, so the write needs no read of the cache
        at = (torch.where(into.unsqueeze(-1), self.write_at, self.scratch_at) + slot.view(b, 1, 1)).view(-1)
        own_pass = rows * P + p   # the block each row attends to: its own pass

        def hook(layer, k, v):
            buf = self.kv[layer]   # [B * P + 1, 2, H, capacity, D]
            heads, dim = buf.shape[2], buf.shape[-1]
            new = torch.stack((k, v), 1).view(b, 1, 2 * heads, dim).expand(b, P, 2 * heads, dim)
            buf.view(-1, dim).index_copy_(0, at, new.reshape(-1, dim))
            out = buf[:, :, :, :keys].index_select(0, own_pass)   # [B, 2, H, keys, D]
            return out[:, 0], out[:, 1]

        pos = slot.view(b, 1)
        hidden, _ = m.stack(self.x, pos, AttentionSpec(q_index=pos), kv_hook=hook)
        logits = m.head(hidden)   # [B, 1, V]
        self.computed_slots += b
        self.acts[p, rows, col] = writing

        last = p == P - 1
        deciding = writing & ~last   # rows whose decision is read: go on?
        s = None
        if P == 1:
            cont = torch.zeros_like(live)
        elif self.scheduled:   # the eval forward's draws for this token (stream = seed)
            plan = m.threshold_plan(m.eval_uniforms(self.plan_rows.view(b, 1), pos, self.seed, salt=2)).view(P, b)
            cont = plan[(p + 1).clamp_max(P - 1), at_row]
        elif self.gated:
            s = self._gate_of_own_pass(hidden, p, deciding)
            cont = s >= m.ponder_cfg.tau
        else:
            cont = torch.ones_like(live)
        cont = cont & deciding
        if self.final_readout:   # a token halting early re-reads at pass P-1, then is done
            to_reread = deciding & ~cont
            completes = live & last
        else:
            to_reread = torch.zeros_like(live)
            completes = live & ~cont

        lg = logits[:, 0]
        if self.logits is not None:   # a done token's logits are this tick's, in both readouts
            self.logits[rows, torch.where(completes, col, self.steps)] = lg.float()
        nxt = next_token(lg, self.count, rows).view(b)
        count = self.count + completes.long()
        self.tokens[rows, torch.where(completes, count, self.steps + 1)] = nxt
        if stop_id is not None:
            count = torch.where(completes & (nxt == stop_id), self.steps, count)
        starts = completes & (count < self.steps)
        x = self.x
        if P > 1:
            update = m.ponder_update(logits)
            if s is not None:
                update = s.to(x.dtype).view(b, 1, 1) * update
            x = torch.where(cont.view(b, 1, 1), x + update, x)
        self.x = torch.where(starts.view(b, 1, 1), m.input_embeddings(nxt.view(b, 1)), x)
        self.pass_idx = torch.where(cont, p + 1, torch.where(to_reread, P - 1, torch.where(completes, 0, p)))
        self.rereading = to_reread
        self.count = count

    def _gate_of_own_pass(self, hidden: torch.Tensor, p: torch.Tensor, deciding: torch.Tensor) -> torch.Tensor:
        """[R]: each tick row's gate of its own pass, s^p, on its hidden (rows not
        ``deciding``: any value in [0, 1], never read)."""
        first, stop = 0, self.passes - 1
        if self._in_range:   # the tick's one host read: the lowest and highest pass that decides
            first, stop = torch.stack([torch.where(deciding, p, self.passes).min(),
                                       torch.where(deciding, p, -1).max() + 1]).tolist()
            if first >= stop:   # no row decides this tick
                return hidden.new_zeros(p.shape[0], dtype=torch.float32)
        s = self.gates(hidden.view(p.shape[0], -1), first, stop)
        return s[self.positions, (p - first).clamp(0, stop - first - 1)]

    def executed(self) -> torch.Tensor:
        """[P, B, steps]: the (pass, token) slots that were active for the fed tokens."""
        return self.acts[:, :, :self.steps]

    @property
    def active_slots(self) -> int:
        return int(self.executed().sum())


#: ``generate_batched(decoder="auto")`` decodes prompts of one length in lockstep when at
#: least this fraction of their (pass, token) slots was active: on CPU a staggered tick costs
#: 1.1-1.3x a lockstep pass (the gates, the per-row gather of the cache, the K/V write into
#: later passes), and the batch's last ticks run fewer rows than it holds, so staggering pays
#: only where halting skips more than ~20% of the slots (at 90% active it ran at 0.85-0.89x of
#: no halting, lockstep at ~1.0x; BENCHMARKS.md "Staggered decoding"; not measured on a GPU)
LOCKSTEP_ABOVE_ACTIVE = 0.8


@torch.no_grad()
def generate_batched(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 50,
                     temperature: float = 1.0, top_k: int = 0, vocab_size: Optional[int] = None,
                     eos_id: Optional[int] = None, seed: int = 0, decoder: str = "auto") -> list[list[int]]:
    """Continuations of a batch of prompts decoded together (vertical families).

    ``decoder``: "staggered" (any prompt lengths, every row at its own pass), "lockstep"
    (prompts of one length, the compacting decoder one token per row at a time), or "auto":
    lockstep when the prompts have one length and at least ``LOCKSTEP_ABOVE_ACTIVE`` of their
    slots were active (halting would save too little to pay for the staggered tick), else
    staggered. At temperature 0 a row's tokens are those it gets alone (the schedule
    baselines: those of row b of a batch, whose halting plan is drawn per row) whichever
    decoder runs; sampled rows draw on the model's device (``models.sampling.sample_rows``, a
    generator seeded with ``seed``), so they differ from one-prompt ``generate()``'s CPU
    draws. A row stops after ``eos_id`` (kept)."""
    if decoder not in ("auto", "staggered", "lockstep"):
        raise ValueError(f"decoder must be 'auto', 'staggered' or 'lockstep', got '{decoder}'")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if min(len(p) for p in prompts) < 1:   # the first new token is picked from the last prompt token's logits
        raise ValueError("generate_batched: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        generator = torch.Generator(device=dev).manual_seed(seed)

        def pick(logits, _done=None, _rows=None):
            return sample_rows(logits[:, :vocab_size] if vocab_size else logits, temperature, top_k, generator)

        staggered = StaggeredDecoder(model, seed)
        last = staggered.prefill([torch.tensor(p, dtype=torch.long, device=dev) for p in prompts],
                                 max_new_tokens)
        lockstep = staggered.prompt_decoder if choose_decoder(staggered, decoder) == "lockstep" else None
        first = pick(last)
        if max_new_tokens == 1:
            tokens = first.view(-1, 1)
        elif lockstep is None:   # the last token is chosen, never fed
            tokens = staggered.decode(first, max_new_tokens - 1, pick, stop_id=eos_id)
        else:
            tokens = _lockstep_tokens(lockstep, first, max_new_tokens, pick, eos_id)
    finally:
        model.train(was_training)
    out = []
    for row in tokens.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        out.append(row)
    return out


def choose_decoder(staggered: StaggeredDecoder, decoder: str = "auto") -> str:
    """"staggered" or "lockstep" for a prefilled StaggeredDecoder (``generate_batched``)."""
    if decoder == "lockstep" and staggered.prompt_decoder is None:
        raise ValueError("decoder='lockstep' needs prompts of one length; use decoder='staggered' "
                         "(or 'auto')")
    if decoder == "auto":
        same_length = staggered.prompt_decoder is not None
        rare_halting = same_length and staggered.prompt_activity() >= LOCKSTEP_ABOVE_ACTIVE
        return "lockstep" if rare_halting else "staggered"
    return decoder


def _lockstep_tokens(decoder: VerticalDecoder, first: torch.Tensor, count: int, pick,
                     stop_id: Optional[int], steps_per_read: int = 8) -> torch.Tensor:
    """``count`` tokens per row [B, count] from a prefilled lockstep decoder, ``first`` the
    first; stops early once every row has emitted ``stop_id`` (checked every
    ``steps_per_read`` tokens: the decoder's own read per token is the only other one)."""
    tokens = [first]
    stopped = first == stop_id if stop_id is not None else None
    for step in range(1, count):
        nxt = pick(decoder.feed(tokens[-1].view(-1, 1))[:, -1])
        tokens.append(nxt)
        if stopped is not None:
            stopped = stopped | (nxt == stop_id)
            if step % steps_per_read == 0 and bool(stopped.all()):
                break
    return torch.stack(tokens, 1)
