"""A static-shape KV-cached decoder for the vertical families: the decode step CUDA graphs
can capture (docs/families.md "Static-shape decoding").

Token-by-token decoding at generation batch sizes is launch-bound on a GPU: every layer of
every pass is a handful of tiny kernels, and the compacting decoder (decoders.py) adds
Python work, ``torch.cat`` growth and data-dependent shapes on top. A CUDA graph replays the
whole step in one launch, but only for a step whose shapes and control flow never change.
:class:`StaticVerticalDecoder` is that step:

* one preallocated ``[B, H_kv, T_max, D]`` key and value cache per (pass, layer), written in
  place at the step's slot (``index_copy_``) instead of grown;
* attention over all ``T_max`` slots with a mask: a key is visible iff it was written by a real
  (not padding) token at a slot <= the query's (``AttentionSpec(q_index=slots,
  key_padding_mask=written)``); the unwritten slots hold zeros and get weight exactly 0;
* every pass runs for every token. AdaPonderLM and the schedule baselines select with
  ``where`` what the compacting decoder computes only for active tokens: a halted token's K/V
  in pass i is its K/V of pass i-1 (KV reuse), its readout the logits of its last active pass
  (``halted_readout: last_active``) or of the last pass (``final``), and only continuing
  tokens get the pondering update. Halting is a hard threshold, so the results equal the
  compacting decoder's (tests/test_static_decode.py: 1e-5 in fp32, greedy tokens equal);
  what compaction saves in FLOPs is spent here, which can still pay where the step is
  launch-bound (measure it: benchmarks/bench_decode.py --static, benchmarks/gpu/check.py).

Batches of prompts of different lengths are left-padded (``attention_mask``, as Hugging Face's
``padding_side="left"``): all rows share the cache slot of a step, each row's positions count
its real tokens only, padding slots are never visible as keys, so every row gets the logits it
gets alone. The schedule baselines draw row b's halting plan at its real positions (what the
compacting decoder draws for row b of an unpadded batch).

``compile=True`` wraps the step in ``torch.compile(dynamic=False, fullgraph=True)``, with
``mode="reduce-overhead"`` (CUDA graphs) on CUDA; the cache tensors are marked as static
addresses so the graph writes them in place. Every decode step after the first reuses the same
graph (tests check that no step recompiles). Multi-token feeds (the prompt) run the same code
eagerly: one compiled shape, the one-token step.

Loop and the latent families (PonderLM-2/3, pause) keep their dynamic decoders: their FamilySpec
declares no ``static_decoder`` and asking for one is a MissingCapability error.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import AttentionSpec
from .spec import family_spec, require


class StaticVerticalDecoder:
    """vanilla / ponderlm / adaponderlm / fixed_pruning / random_halting with a preallocated
    cache for ``batch`` rows and ``max_len`` slots (prompt, padding included, plus new tokens).

    ``feed(ids, attention_mask=None)`` appends ``[batch, n]`` tokens and returns their logits
    ``[batch, n, V]``; one-token feeds go through the (optionally compiled) static step.
    ``executed()`` is the [P, B, T] activity of the real tokens (what the compacting decoder
    would have computed); ``computed_slots`` counts the pass-token slots this decoder ran
    (all of them), ``active_slots`` those that were active."""

    def __init__(self, model, batch: int, max_len: int, seed: int = 0, compile: bool = False,
                 compile_backend: str = "inductor"):
        if batch < 1 or max_len < 1:
            raise ValueError(f"static cache needs batch >= 1 and max_len >= 1, got batch={batch}, "
                             f"max_len={max_len}")
        self.model = model
        spec = family_spec(model.family)
        self.passes = getattr(model, "num_passes", 1)
        self.adaptive = getattr(model, "adaptive", False)
        self.gated = self.adaptive and spec.halting == "gate"
        self.scheduled = self.adaptive and spec.halting == "schedule"
        self.final_readout = self.adaptive and model.ponder_cfg.halted_readout == "final"
        if self.scheduled:
            model.keep_fractions()   # calibrate the schedule once, outside any compiled region
        self.batch, self.max_len, self.seed = batch, max_len, seed
        param = next(model.parameters())
        dev, dtype = param.device, param.dtype
        layer = model.stack.layers[0].attn
        kv_heads = getattr(layer, "num_kv_heads", layer.num_heads)
        shape = (batch, kv_heads, max_len, layer.head_dim)
        # one tensor per (pass, layer), not views of one: an in-place write into a view of a
        # graph input becomes a scatter into the whole base under torch.compile's
        # functionalization, i.e. a copy of every cache per write
        self.k = [[torch.zeros(shape, dtype=dtype, device=dev) for _ in model.stack.layers]
                  for _ in range(self.passes)]
        self.v = [[torch.zeros(shape, dtype=dtype, device=dev) for _ in model.stack.layers]
                  for _ in range(self.passes)]
        self.written = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)  # visible keys
        self.next_position = torch.zeros(batch, dtype=torch.long, device=dev)     # real tokens so far
        self.rows = torch.arange(batch, device=dev).view(-1, 1)
        self.tc = 0   # slots used
        self.activity: list[torch.Tensor] = []
        self.computed_slots = 0
        self._step = type(self)._forward
        self._cuda_graphs = compile and dev.type == "cuda" and compile_backend == "inductor"
        if compile:
            # the cache keeps its address across steps, so CUDA graphs write it in place;
            # guard=False: another decoder of the same shapes reuses the compiled step
            for buf in [self.written, *(t for per_pass in self.k + self.v for t in per_pass)]:
                torch._dynamo.mark_static_address(buf, guard=False)
            self._step = _compiled_step(compile_backend, "reduce-overhead" if self._cuda_graphs else None)

    def _forward(self, ids, slots, positions, real):
        """All passes over tokens ``ids`` [B, n] at cache ``slots`` [n] with rotary
        ``positions`` [B, n]; ``real`` [B, n] is False for left padding. Static shapes, no
        data-dependent Python: the function torch.compile captures."""
        m = self.model
        self.written.index_copy_(1, slots, real)
        spec = AttentionSpec(q_index=slots, key_padding_mask=self.written)
        keep = real[:, None, :, None]
        e = m.input_embeddings(ids)
        active = torch.ones_like(real)
        plan = None
        if self.scheduled:   # the eval forward's draws for these tokens (stream = seed)
            plan = m.threshold_plan(m.eval_uniforms(self.rows.expand_as(positions), positions,
                                                    self.seed, salt=2))
        acts = [active]
        readout = None
        for i in range(self.passes):
            def hook(layer, k, v, i=i, active_kv=active[:, None, :, None]):
                if self.adaptive and i > 0:   # KV reuse: halted tokens keep pass i-1's K/V
                    k = torch.where(active_kv, k, self.k[i - 1][layer].index_select(2, slots))
                    v = torch.where(active_kv, v, self.v[i - 1][layer].index_select(2, slots))
                # padding slots stay zero: never visible, and no NaN can leak through 0 * v
                self.k[i][layer].index_copy_(2, slots, torch.where(keep, k, 0.0))
                self.v[i][layer].index_copy_(2, slots, torch.where(keep, v, 0.0))
                return self.k[i][layer], self.v[i][layer]

            hidden, _ = m.stack(e, positions, spec, kv_hook=hook)
            logits = m.head(hidden)
            last = i == self.passes - 1
            if readout is None or not self.adaptive or (last and self.final_readout):
                readout = logits
            else:   # last_active: a halted token keeps the logits of its last active pass
                readout = torch.where(active.unsqueeze(-1), logits, readout)
            if last:
                break
            s = m.gate_values(i, hidden) if self.gated else None
            if plan is not None:
                cont = active & plan[i + 1]
            elif s is not None:
                cont = active & (s >= m.ponder_cfg.tau)
            else:
                cont = active
            update = m.ponder_update(logits)
            if s is not None:
                update = s.to(e.dtype).unsqueeze(-1) * update
            e = torch.where(cont.unsqueeze(-1), e + update, e)
            active = cont
            acts.append(active)
        return readout, torch.stack(acts)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n = ids.shape
        if b != self.batch:
            raise ValueError(f"static cache was built for batch {self.batch}, fed {b} rows")
        if self.tc + n > self.max_len:
            raise ValueError(f"static cache holds {self.max_len} slots; {self.tc} used, {n} more "
                             f"fed: build the decoder with a larger max_len")
        dev = self.written.device
        ids = ids.to(dev)
        real = (torch.ones(b, n, dtype=torch.bool, device=dev) if attention_mask is None
                else attention_mask.to(dev).bool())
        positions = (self.next_position.unsqueeze(1) + real.long().cumsum(1) - 1).clamp_min(0)
        slots = torch.arange(self.tc, self.tc + n, device=dev)
        if n == 1:
            if self._cuda_graphs:   # a new step: the previous replay's outputs were copied
                torch.compiler.cudagraph_mark_step_begin()
            readout, acts = self._step(self, ids, slots, positions, real)
            if self._cuda_graphs:   # the graph's outputs are overwritten by its next replay
                readout, acts = readout.clone(), acts.clone()
        else:   # a prompt: the same computation, eager (one compiled shape only)
            readout, acts = self._forward(ids, slots, positions, real)
        self.next_position += real.long().sum(1)
        self.tc += n
        acts = acts & real.unsqueeze(0)
        self.activity.append(acts)
        self.computed_slots += self.passes * b * n
        return readout

    @property
    def active_slots(self) -> int:
        """Pass-token slots of real tokens that were active (counted on demand: no device
        sync per step)."""
        return int(self.executed().sum()) if self.activity else 0

    def executed(self) -> torch.Tensor:
        return torch.cat(self.activity, dim=2)  # [P, B, T]


_COMPILED_STEPS: dict = {}


def _compiled_step(backend: str, mode: Optional[str]):
    """One torch.compile wrapper of the step per (backend, mode), shared by every decoder:
    Dynamo caches graphs per wrapper and guards on the shapes, the model and the family's
    constants, so decoders of equal shapes on one model share one compiled graph."""
    key = (backend, mode)
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(StaticVerticalDecoder._forward, dynamic=False,
                                             fullgraph=True, mode=mode, backend=backend)
    return _COMPILED_STEPS[key]


def cache_length(tokens: int, compile: bool) -> int:
    """Cache slots for ``tokens`` (prompt + new tokens): exact when eager; compiled, the next
    power of two (at least 64), so prompts of similar lengths share one compiled step."""
    if not compile:
        return max(1, tokens)
    return max(64, 1 << (max(1, tokens) - 1).bit_length())


def make_static_decoder(model, batch: int, max_len: int, seed: int = 0, compile: bool = False,
                        compile_backend: str = "inductor"):
    """The family's static-shape decoder (its FamilySpec's ``static_decoder``); loop and the
    latent families have none (a MissingCapability error: use make_decoder)."""
    return require(model.family, "static_decoder")(model, batch, max_len, seed, compile, compile_backend)
