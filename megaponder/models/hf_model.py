"""megaponder's models behind the Hugging Face ``PreTrainedModel`` API (the export's model).

An exported folder holds this file and the model core it imports, byte copies of
megaponder/models/ (the exporter, megaponder/convert/hf_export.py, copies them), so it runs
where megaponder is not installed::

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(**tok(["In the beginning", "And God"], return_tensors="pt",
                               padding=True), max_new_tokens=20)
    model.last_generation_iterations    # backbone iterations behind every new token

``forward`` is megaponder's eval-mode ``model(input_ids).logits`` and ``generate`` runs the
family's KV-cached decoder (models/decoders.py): the same code, not a transcription. The
parameter names are megaponder's own (``embed_in``, ``stack.layers.N...``, ``gates``,
``router``, ``pause_embedding``), so weights move both ways unchanged.

The only module of models/ that imports transformers (with hf_config.py); training never
imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .args import ModelConfig
from .decoders import make_decoder
from .hf_config import MegaponderConfig
from .llama import RMSNorm
from .neox import RotaryEmbedding
from .ponder_args import PonderConfig
from .registry import build_model
from .sampling import sample_next
from .spec import family_spec
from .staggered import StaggeredDecoder, supports_staggered


@dataclass
class MegaponderGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: ``sequences`` [B, T + new] (left
    padding kept, ``pad_token_id`` after a row ends), ``iterations`` [B, new] float (backbone
    iterations/steps that produced each new token, 0 after the row ended) and, with
    ``output_scores=True``, ``scores`` (one [B, V] tensor per step)."""

    sequences: torch.LongTensor = None
    iterations: Optional[torch.Tensor] = None
    scores: Optional[tuple] = None


class MegaponderForCausalLM(PreTrainedModel, GenerationMixin):
    """Every megaponder family behind one class; ``config.family`` selects it.

    The family's model (``self.core``, built by models/registry.py) is not a submodule: this
    module shares the core's parameter, buffer and submodule tables, so both see the same
    tensors under megaponder's names (no prefix), whatever transformers replaces while
    loading. Attributes this class does not define are the core's (``ponder_cfg``,
    ``set_eval_stream``, ``last_jacobi_passes``, ...)."""

    config_class = MegaponderConfig
    base_model_prefix = "megaponder"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NeoXLayer", "LlamaLayer"]
    _tied_weights_keys = {"embed_out.weight": "embed_in.weight"}

    def __init__(self, config: MegaponderConfig):
        super().__init__(config)
        # this module's own config classes: transformers may load hf_config.py (for
        # AutoConfig) as another module object than the one this file imports
        sections = config.megaponder_config
        core = build_model(ModelConfig(**sections.get("model", {})),
                           PonderConfig(**sections.get("ponder", {})))
        object.__setattr__(self, "core", core)
        for table in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            object.__setattr__(self, table, getattr(core, table))
        self.last_generation_iterations: Optional[list] = None
        self.post_init()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)   # parameters, buffers, submodules
        except AttributeError:
            core = self.__dict__.get("core")
            if core is None:
                raise
            return getattr(core, name)

    def train(self, mode: bool = True):
        super().train(mode)
        self.core.training = mode   # the core's own flag (its children are shared)
        return self

    def _init_weights(self, module):
        # reached for tensors a checkpoint does not hold: the rotary frequencies (a buffer
        # not saved) always, parameters only for a partial checkpoint
        std = self.core.cfg.init_std
        if isinstance(module, RotaryEmbedding):
            module.reset_inv_freq()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif module is self:   # parameters of the family itself (pause_embedding)
            for p in self._parameters.values():
                if p is not None:
                    nn.init.normal_(p, std=std)

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def get_output_embeddings(self):
        return self.embed_out

    def set_output_embeddings(self, value):
        self.embed_out = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                labels: Optional[torch.LongTensor] = None, past_key_values=None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, V] of the whole sequence (megaponder's forward; eval mode unless the
        model was put in training mode). Positions default to 0..T-1 as in megaponder;
        ``attention_mask`` hides padding keys. ``labels`` gives the usual shifted next-token
        loss. Incremental decoding lives in generate()."""
        if input_ids is None:
            raise ValueError("MegaponderForCausalLM.forward needs input_ids (inputs_embeds is "
                             "not supported: the pondering families re-embed their predictions)")
        if past_key_values is not None:
            raise ValueError("MegaponderForCausalLM.forward takes no past_key_values; use "
                             "generate(), which keeps the family's own KV caches")
        if attention_mask is not None:
            # all keys real: the plain causal kernel, as megaponder's default
            attention_mask = None if bool(attention_mask.bool().all()) else attention_mask.bool()
        logits = self.core(input_ids, position_ids=position_ids, attention_mask=attention_mask).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- generation -----------------------------------------------------------------------
    _RESULT_CHANGING = {"num_beams": 1, "num_return_sequences": 1, "top_p": 1.0,
                        "repetition_penalty": 1.0, "min_new_tokens": 0, "min_length": 0,
                        "no_repeat_ngram_size": 0, "typical_p": 1.0, "penalty_alpha": None,
                        "assistant_model": None, "prefix_allowed_tokens_fn": None,
                        "bad_words_ids": None, "force_words_ids": None, "num_beam_groups": 1}

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.LongTensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, generation_config=None,
                 stopping_criteria=None, max_new_tokens: Optional[int] = None,
                 max_length: Optional[int] = None, do_sample: Optional[bool] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None,
                 eos_token_id=None, pad_token_id: Optional[int] = None,
                 return_dict_in_generate: Optional[bool] = None,
                 output_scores: Optional[bool] = None, seed: int = 0, logits_processor=None,
                 **kwargs):
        """megaponder's adaptive KV-cached decoding (models/decoders.py).

        Batched with LEFT padding through ``attention_mask`` (``tokenizer.padding_side =
        "left"``): a row's tokens are those it gets alone, decoded over its real tokens only.
        Greedy batches of the families whose passes share one stack (vanilla, ponderlm,
        adaponderlm, fixed_pruning, random_halting) run as ONE batch with every row at its own
        pass (models/staggered.py), so a batch costs about one row's ticks, not the sum of its
        rows'; a single row, sampling, ``stopping_criteria`` and the other families decode every
        row with its own decoder, rows advancing one token per step together (so batch-level
        stopping criteria see the whole batch, and sampled rows keep their documented CPU draws).
        Greedy unless ``do_sample`` (then ``temperature``, ``top_k``; draws come from a CPU
        generator seeded with ``seed``, as ``megaponder generate --seed``). Sampling never
        picks a padding row of the vocabulary. A row stops at ``eos_token_id`` (kept) or when
        ``stopping_criteria(sequences, scores)`` says so; later slots hold ``pad_token_id``.
        Sets ``self.last_generation_iterations``: per row, the backbone iterations (vertical
        families) or steps (latent families) that produced each new token. Other transformers
        generate kwargs that do not change the result (use_cache, output_attentions, ...) are
        accepted and ignored; ones that would (beam search, top_p, penalties) raise.
        """
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        if logits_processor:
            raise ValueError("generate(): logits_processor is not supported by the megaponder "
                             "decoder (it would change the result); drop it")
        gc = generation_config if generation_config is not None else self.generation_config

        def opt(name, value, default):
            if value is not None:
                return value
            got = getattr(gc, name, None) if gc is not None else None
            return default if got is None else got

        for name, neutral in self._RESULT_CHANGING.items():
            value = kwargs.get(name, None)
            if value is None and gc is not None and name not in ("assistant_model",
                                                                 "prefix_allowed_tokens_fn"):
                value = getattr(gc, name, None)
            if value is not None and value != neutral:
                raise ValueError(f"generate(): {name}={value!r} is not supported by the megaponder "
                                 f"decoder (greedy or temperature/top-k sampling only)")
        do_sample = bool(opt("do_sample", do_sample, False))
        temperature = float(opt("temperature", temperature, 1.0)) if do_sample else 0.0
        top_k = int(opt("top_k", top_k, 0)) if do_sample else 0
        eos = opt("eos_token_id", eos_token_id, getattr(self.config, "eos_token_id", None))
        if torch.is_tensor(eos):
            eos = eos.tolist()
        eos_ids = (set() if eos is None
                   else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})
        pad = opt("pad_token_id", pad_token_id, getattr(self.config, "pad_token_id", None))
        if pad is None:
            pad = min(eos_ids) if eos_ids else 0
        b, t = input_ids.shape
        if max_new_tokens is None:
            if max_length is not None:
                max_new_tokens = max_length - t
            else:
                max_new_tokens = getattr(gc, "max_new_tokens", None)
                if max_new_tokens is None:
                    max_new_tokens = int(getattr(gc, "max_length", None) or 20) - t
        max_new_tokens = max(0, int(max_new_tokens))
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        vocab = self.config.tokenizer_vocab_size
        was_training = self.training
        self.eval()
        if (b > 1 and not do_sample and not stopping_criteria and max_new_tokens > 0
                and self._rows_together()):
            prompts = [self._real_tokens(input_ids, mask, r)[0] for r in range(b)]
            try:
                new, iter_out, scores, count = self._greedy_together(
                    prompts, max_new_tokens, eos_ids, int(pad), vocab, seed, bool(output_scores))
            finally:
                self.train(was_training)
            return self._generate_result(input_ids, new, iter_out, scores, count,
                                         return_dict_in_generate, output_scores)
        rows = [_Row(self.core, seed, self._real_tokens(input_ids, mask, r)) for r in range(b)]
        samplers = [torch.Generator().manual_seed(seed) for _ in range(b)]
        finished = [False] * b
        count = [0] * b  # tokens each row generated
        new = torch.full((b, max_new_tokens), int(pad), dtype=torch.long, device=input_ids.device)
        iter_out = torch.zeros(b, max_new_tokens, dtype=torch.float32)
        scores = []
        steps = 0
        for step in range(max_new_tokens):
            step_scores = torch.full((b, rows[0].logits.shape[-1]), float("-inf"))
            for r, row in enumerate(rows):
                if finished[r]:
                    continue
                row_logits = row.logits[:vocab]
                step_scores[r, :vocab] = row_logits.cpu()
                nxt = sample_next(row_logits, temperature, top_k, samplers[r])
                new[r, step] = nxt
                count[r] += 1
                iter_out[r, step] = row.iterations
                if nxt in eos_ids:
                    finished[r] = True
            steps = step + 1
            if output_scores:
                scores.append(step_scores)
            if stopping_criteria:
                # a StoppingCriteriaList, a plain list of criteria or one callable; each may
                # answer one bool for the batch or one per row
                criteria = stopping_criteria if isinstance(stopping_criteria, (list, tuple)) \
                    else [stopping_criteria]
                seqs = torch.cat([input_ids, new[:, :steps]], dim=1)
                for criterion in criteria:
                    done = criterion(seqs, step_scores.to(input_ids.device))
                    if isinstance(done, bool) or (torch.is_tensor(done) and done.dim() == 0):
                        done = [bool(done)] * b
                    finished = [f or bool(d) for f, d in zip(finished, done)]
            if all(finished) or step == max_new_tokens - 1:
                break
            for r, row in enumerate(rows):
                if not finished[r]:
                    row.feed(new[r, step].view(1, 1))
        self.train(was_training)
        return self._generate_result(input_ids, new[:, :steps], iter_out[:, :steps], scores, count,
                                     return_dict_in_generate, output_scores)

    def _generate_result(self, input_ids, new, iter_out, scores, count, return_dict_in_generate,
                         output_scores):
        """generate()'s answer from the new tokens [B, steps] (``pad_token_id`` after a row
        ended), their iterations [B, steps] and ``count`` (the tokens of every row)."""
        sequences = torch.cat([input_ids, new], dim=1)
        self.last_generation_iterations = [iter_out[r, :count[r]].tolist() for r in range(len(count))]
        if return_dict_in_generate:
            return MegaponderGenerateOutput(sequences=sequences, iterations=iter_out,
                                            scores=tuple(scores) if output_scores else None)
        return sequences

    #: decode a greedy batch with one staggered decoder where that gives the rows' own tokens
    #: (False: always one decoder per row, the reference path)
    _staggered_batches: bool = True

    def _rows_together(self) -> bool:
        """Whether one StaggeredDecoder (models/staggered.py) gives every row the tokens,
        logits and iterations of its own one-row decoder: the families whose passes share one
        stack (the schedule baselines too: every row draws its halting plan as a lone row, row
        0 of stream ``seed``, as ``_Row`` does; ``_greedy_together``)."""
        return self._staggered_batches and supports_staggered(self.core)

    def _greedy_together(self, prompts, max_new_tokens: int, eos_ids: set, pad: int, vocab: int,
                         seed: int, output_scores: bool):
        """Greedy decoding of every row at once (each row at its own pass, no padding), with
        the per-row loop's results: new tokens [B, steps], iterations [B, steps], the scores
        per step and the tokens of every row.

        The prompts are prefilled but their last token, which is then fed as the first token
        of the decode: its activity (``executed()``) is the iterations behind the first new
        token, as the one-row decoder's last prompt position. Fed token k's logits choose new
        token k. A one-token prompt prefills nothing (an empty row; prefill's NaN logits for it
        are never read). Every row draws the schedule baselines' halting plan as a lone row
        (``draw_rows`` 0), as the one-row decoder. The same operations as one-row decoding, in
        another float32 association (tests/test_staggered_decode.py: 1e-5)."""
        b, dev = len(prompts), prompts[0].device
        decoder = StaggeredDecoder(self.core, seed)
        decoder.draw_rows = torch.zeros(b, dtype=torch.long)   # each row: row 0 of its own batch
        decoder.prefill([p[:-1] for p in prompts], max_new_tokens)
        last = torch.stack([p[-1] for p in prompts])
        # a single eos ends a row inside the decoder (no ticks after it) unless a prompt ends
        # with it (the decoder would take that row as done); otherwise rows are cut below
        stop = next(iter(eos_ids)) if len(eos_ids) == 1 else None
        if stop is not None and bool((last == stop).any()):
            stop = None
        out = decoder.decode(last, max_new_tokens, lambda lg, done, rows: lg[:, :vocab].float().argmax(-1),
                             stop_id=stop, keep_logits=output_scores)
        tokens, logits = out if output_scores else (out, None)
        chosen = tokens[:, 1:].cpu()   # [B, new]: the token chosen after every fed token
        count = []
        for row in chosen.tolist():
            ends = [k for k, tok in enumerate(row) if tok in eos_ids]
            count.append(ends[0] + 1 if ends else max_new_tokens)
        steps = max(count)
        ended = torch.arange(steps).view(1, -1) >= torch.tensor(count).view(-1, 1)   # [B, steps]
        new = chosen[:, :steps].masked_fill(ended, pad).to(dev)
        iter_out = decoder.executed().sum(0)[:, :steps].float().cpu().masked_fill(ended, 0.0)
        scores = []
        if output_scores:
            full = torch.full((b, steps, logits.shape[-1]), float("-inf"))
            full[:, :, :vocab] = logits[:, :steps, :vocab].float().cpu()
            full.masked_fill_(ended.unsqueeze(-1), float("-inf"))
            scores = list(full.unbind(1))
        return new, iter_out, scores, count

    @staticmethod
    def _real_tokens(input_ids, mask, r: int) -> torch.Tensor:
        """Row ``r``'s tokens without its left padding, as [1, n]."""
        t = input_ids.shape[1]
        n_real = int(mask[r].sum())
        if n_real == 0:
            raise ValueError(f"generate(): row {r} has no tokens (attention_mask all 0)")
        if not bool(mask[r, t - n_real:].all()):
            raise ValueError("generate() needs LEFT padding: set tokenizer.padding_side = "
                             "'left' (a row's real tokens must be the last ones)")
        return input_ids[r:r + 1, t - n_real:]


class _Row:
    """One row's decoder (its own caches; draws of a lone row of stream ``seed``), the
    logits of its next token and the iterations (vertical) or steps (latent) behind them."""

    def __init__(self, model, seed: int, prompt: torch.Tensor):
        self.decoder = make_decoder(model, seed)
        self.latent = family_spec(model.family).kind == "latent"
        self.feed(prompt)

    def feed(self, ids: torch.Tensor) -> None:
        self.logits = self.decoder.feed(ids)[0, -1].float()
        executed = self.decoder.executed()   # latent: steps per token; else [P, 1, T] activity
        self.iterations = float(executed[-1] if self.latent else executed[:, 0, -1].sum())
