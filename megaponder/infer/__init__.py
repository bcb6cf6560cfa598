"""Sampling from any megaponder model.

``generate`` samples with the family's KV-cached (and, for adaptive ones, compacting)
decoder, the one its FamilySpec declares (megaponder/models/decoders.py); ``cached=False``
recomputes the whole prefix each step instead, which is exact for every family because they
are all causal. ``static_cache=True`` decodes on a preallocated cache with a fixed-shape step
instead (vertical families; megaponder/models/static_cache.py) and ``compile=True`` compiles
that step (CUDA graphs on CUDA); the tokens are the same. A family without the decoder asked
for is an error.

``generate_batch`` continues many prompts (any lengths) at once: the vertical families with
the staggered decoder (megaponder/models/staggered.py: every row at its own pass, so halting
saves time in a batch) or, for prompts of one length where halting is rare, in lockstep
(``decoder="auto"``, see ``generate_batched``); the other families one prompt after another.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.sampling import sample_next
from ..models.staggered import generate_batched, supports_staggered


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int = 0, vocab_size: Optional[int] = None, eos_id: Optional[int] = None,
             seed: int = 0, cached: bool = True, static_cache: bool = False,
             compile: bool = False) -> list[int]:
    """Token ids of the continuation (prompt excluded). temperature 0 means greedy."""
    if (static_cache or compile) and not cached:
        raise ValueError("generate(): static_cache/compile need the cached decoder; drop "
                         "cached=False")
    if cached:
        from ..models.decoders import generate_cached
        return generate_cached(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, vocab_size=vocab_size, eos_id=eos_id, seed=seed,
                               static_cache=static_cache, compile=compile)
    generator = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids).logits[0, -1].float()
        if vocab_size is not None:
            logits = logits[:vocab_size]  # never sample a padding row
        next_id = sample_next(logits, temperature, top_k, generator)
        new.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[next_id]], device=dev)], dim=1)
    return new


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int = 50, temperature: float = 1.0,
                   top_k: int = 0, vocab_size: Optional[int] = None, eos_id: Optional[int] = None,
                   seed: int = 0, decoder: str = "auto") -> list[list[int]]:
    """Token ids of each prompt's continuation (prompts excluded), temperature 0 greedy;
    ``decoder`` ("auto", "staggered", "lockstep") applies to the vertical families."""
    if supports_staggered(model):
        return generate_batched(model, prompts, max_new_tokens, temperature, top_k, vocab_size,
                                eos_id, seed, decoder)
    return [generate(model, p, max_new_tokens, temperature, top_k, vocab_size, eos_id, seed)
            for p in prompts]
