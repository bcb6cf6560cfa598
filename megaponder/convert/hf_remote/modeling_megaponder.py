"""megaponder pondering language models for Hugging Face ``transformers`` (remote code).

Self-contained: imports torch and transformers only, so an exported folder runs where
megaponder is not installed::

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(**tok(["In the beginning", "And God"], return_tensors="pt",
                               padding=True), max_new_tokens=20)
    model.last_generation_iterations    # backbone iterations behind every new token

The parameter names equal megaponder's own (``embed_in``, ``stack.layers.N...``, ``gates``,
``router``, ``pause_embedding``), so the weights move in both directions unchanged. The math
is a transcription of megaponder's models (megaponder/models/{neox,ponder,latent,baselines}.py):
``forward`` equals megaponder's ``model(input_ids).logits`` in eval mode, and ``generate``
runs megaponder's KV-cached decoders (megaponder/models/decoders.py): AdaPonderLM computes
only the tokens still active at each iteration and reuses a halted token's K/V, PonderLM-3
computes only the steps the router keeps, PonderLM-2/3 feed each latent thought back one step
at a time. Greedy decoding gives megaponder's tokens exactly (tests/test_hf_export.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_megaponder import MegaponderConfig

VERTICAL = ("ponderlm", "adaponderlm", "fixed_pruning", "random_halting")
LATENT = ("ponderlm2", "ponderlm3", "pause")
PLANNED = ("fixed_pruning", "random_halting")


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
@dataclass
class AttentionSpec:
    """Mask in index space: query i sits at key index q_index[i] and (causal) sees keys
    j <= q_index[i]; key padding and an additive key bias compose with it."""

    causal: bool = True
    q_index: Optional[torch.Tensor] = None           # [Tq] or [B, Tq]; None: the last Tq keys
    key_padding_mask: Optional[torch.Tensor] = None  # [B, Tk] True for real keys
    key_bias: Optional[torch.Tensor] = None          # broadcastable to [B, H, Tq, Tk]

    def is_plain_causal(self, tq: int, tk: int) -> bool:
        return (self.causal and self.q_index is None and self.key_padding_mask is None
                and self.key_bias is None and tq == tk)

    def allowed(self, batch: int, tq: int, tk: int, device) -> Optional[torch.Tensor]:
        allowed = None
        if self.q_index is None:
            q_idx = torch.arange(tk - tq, tk, device=device)
        else:
            q_idx = self.q_index.to(device)
        q_idx = q_idx.expand(batch, tq) if q_idx.dim() == 1 else q_idx
        if self.causal:
            allowed = torch.arange(tk, device=device).view(1, 1, tk) <= q_idx.unsqueeze(-1)
        if self.key_padding_mask is not None:
            keep = self.key_padding_mask.to(device).bool().unsqueeze(1)
            allowed = keep.expand(batch, tq, tk) if allowed is None else allowed & keep
        return None if allowed is None else allowed.unsqueeze(1)

    def additive_mask(self, batch: int, tq: int, tk: int, dtype, device) -> Optional[torch.Tensor]:
        # a finite minimum keeps fully masked (padding) query rows finite, as transformers does
        allowed = self.allowed(batch, tq, tk, device)
        mask = None
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        if self.key_bias is not None:
            bias = self.key_bias.to(device=device, dtype=dtype)
            mask = bias if mask is None else mask + bias
            if allowed is not None:
                mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return mask


def attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, _, tq, _ = q.shape
    tk = k.shape[-2]
    if spec.is_plain_causal(tq, tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = spec.additive_mask(b, tq, tk, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------
# the GPT-NeoX backbone (megaponder/models/neox.py)
# ----------------------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_pct: float, base: float):
        super().__init__()
        self.rotary_dim = int(head_dim * rotary_pct)
        self.base = base

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # inv_freq is recomputed (no buffer): transformers builds models on the meta device
        # and would leave a non-persistent buffer uninitialised
        dim = self.rotary_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                     device=position_ids.device) / dim))
        freqs = position_ids.float().unsqueeze(-1) * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x, cos, sin):
        if self.rotary_dim == 0:
            return x
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, keep], dim=-1)


class NeoXAttention(nn.Module):
    def __init__(self, config: MegaponderConfig, layer_index: int):
        super().__init__()
        d = config.hidden_size
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.rotary = RotaryEmbedding(self.head_dim, config.rotary_pct, config.rotary_emb_base)

    def forward(self, x, cos, sin, spec, kv_hook=None):
        qkv = self.qkv(x)
        b, t = qkv.shape[:2]
        q, k, v = qkv.view(b, t, self.num_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if kv_hook is not None:
            k, v = kv_hook(self.layer_index, k, v)
        ctx = attention(q, k, v, spec)
        return self.out(ctx.transpose(1, 2).reshape(b, t, -1)), (k, v)


class NeoXMLP(nn.Module):
    def __init__(self, config: MegaponderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class NeoXLayer(nn.Module):
    def __init__(self, config: MegaponderConfig, layer_index: int):
        super().__init__()
        self.parallel_residual = config.use_parallel_residual
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = NeoXAttention(config, layer_index)
        self.mlp = NeoXMLP(config)

    def forward(self, x, cos, sin, spec, kv_hook=None):
        attn_out, kv = self.attn(self.ln_attn(x), cos, sin, spec, kv_hook)
        if self.parallel_residual:
            return x + attn_out + self.mlp(self.ln_mlp(x)), kv
        x = x + attn_out
        return x + self.mlp(self.ln_mlp(x)), kv


class NeoXStack(nn.Module):
    """All layers plus the final LayerNorm: the primitive every family iterates."""

    def __init__(self, config: MegaponderConfig):
        super().__init__()
        self.layers = nn.ModuleList(NeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inputs_embeds, position_ids, spec=None, kv_hook=None, apply_final_norm=True):
        spec = spec or AttentionSpec()
        cos, sin = self.layers[0].attn.rotary.cos_sin(position_ids, inputs_embeds.dtype)
        x, kvs = inputs_embeds, []
        for layer in self.layers:
            x, kv = layer(x, cos, sin, spec, kv_hook)
            kvs.append(kv)
        return (self.final_norm(x) if apply_final_norm else x), kvs


# ----------------------------------------------------------------------------------------
# the LLaMA backbone (megaponder/models/llama.py): same primitive, GQA caches keep the
# num_key_value_heads heads and are repeated right before attention
# ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: MegaponderConfig, layer_index: int):
        super().__init__()
        d = config.hidden_size
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, 1.0, config.rotary_emb_base)

    def forward(self, x, cos, sin, spec, kv_hook=None):
        b, t = x.shape[:2]
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if kv_hook is not None:
            k, v = kv_hook(self.layer_index, k, v)
        n_rep = q.shape[1] // k.shape[1]
        ctx = attention(q, k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1), spec)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, -1)), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, config: MegaponderConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, config: MegaponderConfig, layer_index: int):
        super().__init__()
        self.ln_attn = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.ln_mlp = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.attn = LlamaAttention(config, layer_index)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, spec, kv_hook=None):
        attn_out, kv = self.attn(self.ln_attn(x), cos, sin, spec, kv_hook)
        x = x + attn_out
        return x + self.mlp(self.ln_mlp(x)), kv


class LlamaStack(NeoXStack):
    """NeoXStack's forward over LLaMA layers and a final RMSNorm."""

    def __init__(self, config: MegaponderConfig):
        nn.Module.__init__(self)
        self.layers = nn.ModuleList(LlamaLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class GateMLP(nn.Module):
    """AdaPonderLM gate (1 logit) / PonderLM-3 router (K+1 logits)."""

    def __init__(self, d: int, hidden: int, out_features: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, h):
        return self.fc2(self.act(self.fc1(h)))


def interleave(stages):
    return torch.stack(stages, dim=2).flatten(1, 2)


def repeat_stages(x, n):
    return None if x is None else x.repeat_interleave(n, dim=1)


def log_survival(router_logits):
    log_s = torch.log_softmax(router_logits.float(), dim=-1)
    log_w = torch.logcumsumexp(log_s.flip(-1), dim=-1).flip(-1)
    log_w = torch.cat([torch.zeros_like(log_w[..., :1]), log_w[..., 1:]], dim=-1)
    return log_s.exp(), log_w


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------
@dataclass
class MegaponderGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: ``sequences`` [B, T + new] (left
    padding kept, ``pad_token_id`` after a row ends), ``iterations`` [B, new] float (backbone
    iterations/steps that produced each new token, 0 after the row ended) and, with
    ``output_scores=True``, ``scores`` (one [B, V] tensor per step)."""

    sequences: torch.LongTensor = None
    iterations: Optional[torch.Tensor] = None
    scores: Optional[tuple] = None


class MegaponderPreTrainedModel(PreTrainedModel):
    config_class = MegaponderConfig
    base_model_prefix = "megaponder"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NeoXLayer", "LlamaLayer"]

    def _init_weights(self, module):
        # only reached for tensors missing from a checkpoint; megaponder's export has them all
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MegaponderForCausalLM) and module.pause_embedding is not None:
            nn.init.normal_(module.pause_embedding, std=std)


class MegaponderForCausalLM(MegaponderPreTrainedModel, GenerationMixin):
    """Every pondering family of megaponder behind one class; ``config.family`` selects it."""

    _tied_weights_keys = {"embed_out.weight": "embed_in.weight"}

    def __init__(self, config: MegaponderConfig):
        super().__init__(config)
        d = config.hidden_size
        self.family = config.family
        self.ponder_cfg = p = SimpleNamespace(**config.ponder)
        self.embed_in = nn.Embedding(config.vocab_size, d)
        self.stack = (LlamaStack if getattr(config, "backbone", "neox") == "llama" else NeoXStack)(config)
        self.embed_out = nn.Linear(d, config.vocab_size, bias=False)
        self.gates = self.router = self.pause_embedding = None
        self.adaptive = self.family in ("adaponderlm",) + PLANNED
        if self.family == "adaponderlm":
            self.gates = nn.ModuleList(GateMLP(d, p.gate_hidden_mult * d, 1, p.gate_activation)
                                       for _ in range(p.steps))
        if self.family == "ponderlm3":
            self.router = GateMLP(d, p.router_hidden_mult * d, p.steps + 1, p.gate_activation)
        if self.family == "pause":
            self.pause_embedding = nn.Parameter(torch.zeros(d))
        if self.family in VERTICAL + ("loop",):
            self.num_passes = p.steps + 1
        else:
            self.num_stages = p.pause_tokens + 1 if self.family == "pause" else p.steps + 1
        # megaponder's scales: sqrt(d) for the vertical families and pause, sqrt(2.5 d) (the
        # PonderLM-2 code's, ponder.thought_embed_scale) for the latent families and loop
        if self.family in ("loop", "ponderlm2", "ponderlm3"):
            self.embed_scale = math.sqrt(p.thought_embed_scale * d) if p.scale_embeds else 1.0
        else:
            self.embed_scale = math.sqrt(d) if p.scale_embeds else 1.0
        # which evaluation batch forward()'s random draws belong to (set_eval_stream)
        self.eval_stream = 0
        # PonderLM-2/3: Jacobi passes and final residual of the last forward (as megaponder's
        # stats jacobi_passes / jacobi_residual)
        self.last_jacobi_passes: Optional[int] = None
        self.last_jacobi_residual: Optional[float] = None
        self.last_generation_iterations: Optional[list] = None
        self.post_init()

    # -- transformers plumbing ------------------------------------------------------------
    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def get_output_embeddings(self):
        return self.embed_out

    def set_output_embeddings(self, value):
        self.embed_out = value

    # -- pieces (names as in megaponder, so the decoders below read like megaponder/models/decoders.py) -----
    def embed(self, input_ids):
        return self.embed_in(input_ids)

    def head(self, hidden):
        return self.embed_out(hidden)

    def input_embeddings(self, input_ids):
        e = self.embed(input_ids) * self.embed_scale
        if self.family == "loop":
            return e   # megaponder's LoopLM never multiplies by the steps
        if self.ponder_cfg.multiply_steps and self.ponder_cfg.steps > 0:
            e = e * self.ponder_cfg.steps
        return e

    def token_embeddings(self, input_ids):
        return self.embed(input_ids) * self.embed_scale

    def ponder_embedding(self, logits):
        k = self.ponder_cfg.top_k
        weight = self.embed_in.weight
        if k and k < logits.shape[-1]:
            vals, idx = torch.topk(logits.float(), k, dim=-1)
            probs = torch.softmax(vals, dim=-1).to(weight.dtype)
            return torch.einsum("...k,...kd->...d", probs, F.embedding(idx, weight))
        return torch.softmax(logits.float(), dim=-1).to(weight.dtype) @ weight

    def ponder_update(self, logits):
        return self.ponder_embedding(logits) * self.embed_scale

    def gate_values(self, i, hidden):
        if self.gates is None:
            return None
        return torch.sigmoid(self.gates[i](hidden).squeeze(-1).float())

    def set_eval_stream(self, stream: int) -> None:
        """The random halting/pruning draws of the next forwards belong to evaluation batch
        ``stream`` (megaponder's ``set_eval_stream``; its evaluator uses the global batch
        index). The default 0 is what megaponder's ``model(input_ids)`` and its decoder with
        seed 0 draw; ``generate(seed=s)`` draws stream ``s``."""
        self.eval_stream = int(stream)

    def eval_uniforms(self, rows, positions, stream: int, salt: int = 0):
        """megaponder's PonderMixin.eval_uniforms: counter-based uniforms in [0, 1), a pure
        function of (ponder.sample_seed, salt, stream, row, position), so the whole-sequence
        forward and the decoder (positions as they arrive) draw the same number per token."""
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

    def threshold_plan(self, u):
        r = torch.tensor(self.config.keep_fractions, device=u.device, dtype=u.dtype)
        return u.unsqueeze(0) < r.view(-1, *([1] * u.dim()))

    def halting_plan(self, batch, seq, device, valid):
        rows = torch.arange(batch).view(-1, 1).expand(batch, seq)
        pos = torch.arange(seq).view(1, -1).expand(batch, seq)
        u = self.eval_uniforms(rows, pos, self.eval_stream, salt=2).to(device)
        if self.family == "random_halting":
            return self.threshold_plan(u)
        # fixed_pruning: exactly round(r_i * n) tokens of each sequence stay active
        u = torch.where(valid, u, torch.full_like(u, 2.0))
        rank = u.argsort(dim=1).argsort(dim=1).to(torch.float32)
        n = valid.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
        r = torch.tensor(self.config.keep_fractions, device=device, dtype=torch.float32)
        plan = rank.unsqueeze(0) < torch.round(r.view(-1, 1, 1) * n.unsqueeze(0))
        plan[0] = True
        return plan

    # -- family forwards (megaponder's eval-mode forward, logits only) ---------------------
    def _vertical_logits(self, input_ids, position_ids, attention_mask):
        b, t = input_ids.shape
        p = self.ponder_cfg
        spec = AttentionSpec(key_padding_mask=attention_mask)
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.bool())
        e = self.input_embeddings(input_ids)
        active = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        plan = self.halting_plan(b, t, input_ids.device, valid) if self.family in PLANNED else None
        prev_kv, h_read, hidden = None, None, None
        for i in range(self.num_passes):
            hook = None
            if self.adaptive and i > 0:
                hook = _ReuseKV(active, prev_kv)
            hidden, prev_kv = self.stack(e, position_ids, spec, kv_hook=hook)
            if h_read is None or not self.adaptive:
                h_read = hidden
            else:
                h_read = torch.where(active.unsqueeze(-1), hidden, h_read)
            if i == self.num_passes - 1:
                break
            s = self.gate_values(i, hidden)
            if plan is not None:
                new_active = active & plan[i + 1]
            elif s is not None:
                new_active = active & (s >= p.tau)
            else:
                new_active = active
            weight = new_active.to(e.dtype) if s is None else s.to(e.dtype) * new_active.to(e.dtype)
            e = e + weight.unsqueeze(-1) * self.ponder_update(self.head(hidden))
            active = new_active
        if p.halted_readout == "final" or not self.adaptive:
            h_read = hidden
        return self.head(h_read)

    def _loop_logits(self, input_ids, position_ids, attention_mask):
        spec = AttentionSpec(key_padding_mask=attention_mask)
        x = self.input_embeddings(input_ids)
        for _ in range(self.num_passes):
            x, _ = self.stack(x, position_ids, spec, apply_final_norm=False)
        return self.head(self.stack.final_norm(x))

    def run_stages(self, stages, position_ids, attention_mask=None, key_bias=None):
        n = len(stages)
        b, t, d = stages[0].shape
        spec = AttentionSpec(key_padding_mask=repeat_stages(attention_mask, n), key_bias=key_bias)
        hidden, kvs = self.stack(interleave(stages), repeat_stages(position_ids, n), spec)
        return hidden.view(b, t, n, d), kvs

    def route(self, h0):
        s, log_w = log_survival(self.router(h0) / getattr(self.ponder_cfg, "router_temperature", 1.0))
        keep = log_w >= math.log(self.ponder_cfg.tau)
        keep[..., 0] = True
        return s, log_w, keep

    def _pass_bias(self, n, state):
        if state is None or self.router is None:
            return None
        p = self.ponder_cfg
        _, log_w, keep = state
        dtype = self.embed_in.weight.dtype
        bias = log_w[:, :, :n].to(dtype)
        if self._hard_prune:
            bias = bias.masked_fill(~keep[:, :, :n], torch.finfo(dtype).min)
        bias = bias.flatten(1)
        b, tk = bias.shape
        if p.bias_own_steps:
            return bias.view(b, 1, 1, tk)
        tok = torch.arange(tk, device=bias.device) // n
        same = tok.view(tk, 1) == tok.view(1, tk)
        return torch.where(same, torch.zeros((), dtype=dtype, device=bias.device), bias.view(b, 1, 1, tk))

    @property
    def _hard_prune(self) -> bool:
        # megaponder's PonderLM3.hard_prune outside training (this class only evaluates):
        # ponder.eval_hard_prune, the decoder's pruning; exports written before the key
        # existed get megaponder's default, as importing them back does
        return bool(getattr(self.ponder_cfg, "eval_hard_prune", True))

    def _after_pass(self, hidden, state):
        return self.route(hidden[:, :, 0]) if self.router is not None else state

    def _latent_logits(self, input_ids, position_ids, attention_mask):
        p, K = self.ponder_cfg, self.num_stages - 1
        e0 = self.token_embeddings(input_ids)
        if self.family == "pause":
            pause = (self.pause_embedding.to(e0.dtype) * self.embed_scale).expand_as(e0)
            hidden, _ = self.run_stages([e0] + [pause] * K, position_ids, attention_mask)
            return self.head(hidden[:, :, -1])
        state, thoughts = None, []
        if p.buildup_passes:
            for k in range(K):
                hidden, _ = self.run_stages([e0] + thoughts, position_ids, attention_mask,
                                            self._pass_bias(k + 1, state))
                state = self._after_pass(hidden, state)
                thoughts = [hidden[:, :, j] for j in range(k + 1)]
        else:
            thoughts = [torch.zeros_like(e0) for _ in range(K)]
        # megaponder's LatentLM.jacobi_count / PonderLM2.latent_forward outside training:
        # eval_mode 'official' runs eval_jacobi_passes passes; 'exact' (the default, also for
        # exports older than the key) iterates until no thought moves by more than
        # eval_jacobi_tol, at most T*(K+1) passes (Jacobi on a causal chain of that length
        # fixes one more position per pass)
        if getattr(p, "eval_mode", "exact") == "official":
            limit, tol = p.eval_jacobi_passes, None
        else:
            limit, tol = e0.shape[1] * (K + 1), getattr(p, "eval_jacobi_tol", 1e-5)
        done, residual = 0, 0.0
        while done < limit:
            hidden, _ = self.run_stages([e0] + thoughts, position_ids, attention_mask,
                                        self._pass_bias(K + 1, state))
            state = self._after_pass(hidden, state)
            new = [hidden[:, :, j] for j in range(K)]
            done += 1
            if tol is not None:
                residual = (max(float((a - b).detach().abs().max()) for a, b in zip(new, thoughts))
                            if K else 0.0)
            thoughts = new
            if tol is not None and residual <= tol:
                break
        self.last_jacobi_passes, self.last_jacobi_residual = done, residual
        hidden, _ = self.run_stages([e0] + thoughts, position_ids, attention_mask,
                                    self._pass_bias(K + 1, state))
        state = self._after_pass(hidden, state)
        if self.router is None:
            return self.head(hidden[:, :, -1])
        s, _, keep = state
        if self._hard_prune:
            s = s * keep
            if p.renormalize_pruned:
                s = s / s.sum(-1, keepdim=True)
        return self.head(torch.einsum("btk,btkd->btd", s.to(hidden.dtype), hidden))

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                labels: Optional[torch.LongTensor] = None, past_key_values=None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, V] of the whole sequence (megaponder's eval-mode forward). Positions
        default to 0..T-1 as in megaponder; ``attention_mask`` hides padding keys. ``labels``
        gives the usual shifted next-token loss. Incremental decoding lives in generate()."""
        if input_ids is None:
            raise ValueError("MegaponderForCausalLM.forward needs input_ids (inputs_embeds is "
                             "not supported: the pondering families re-embed their predictions)")
        if past_key_values is not None:
            raise ValueError("MegaponderForCausalLM.forward takes no past_key_values; use "
                             "generate(), which keeps the family's own KV caches")
        if position_ids is None:
            b, t = input_ids.shape
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None  # all keys real: the plain causal kernel, as megaponder's default
        if self.family in VERTICAL:
            logits = self._vertical_logits(input_ids, position_ids, attention_mask)
        elif self.family == "loop":
            logits = self._loop_logits(input_ids, position_ids, attention_mask)
        else:
            logits = self._latent_logits(input_ids, position_ids, attention_mask)
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
        """megaponder's adaptive KV-cached decoding.

        Batched with LEFT padding through ``attention_mask`` (``tokenizer.padding_side =
        "left"``). Vertical families and loop decode the batch in one decoder (batched caches,
        padding hidden from attention, positions counted over a row's real tokens, the active
        tokens of all rows packed per iteration); latent families decode each row with its
        own cache. Either way all rows advance one token per step and a row's tokens are the
        ones it gets alone.
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
        vocab = self.config.tokenizer_vocab_size or self.config.vocab_size
        was_training = self.training
        self.eval()
        prompts = []
        for r in range(b):
            m = mask[r]
            n_real = int(m.sum())
            if n_real == 0:
                raise ValueError(f"generate(): row {r} has no tokens (attention_mask all 0)")
            if not bool(m[t - n_real:].all()):
                raise ValueError("generate() needs LEFT padding: set tokenizer.padding_side = "
                                 "'left' (a row's real tokens must be the last ones)")
            prompts.append(input_ids[r, t - n_real:])
        if self.family in LATENT:
            rows = _RowByRow(self, seed, prompts)
        else:
            rows = _Lockstep(self, seed, input_ids, mask)
        samplers = [torch.Generator().manual_seed(seed) for _ in range(b)]
        finished = [False] * b
        count = [0] * b  # tokens each row generated
        new = torch.full((b, max_new_tokens), int(pad), dtype=torch.long, device=input_ids.device)
        iter_out = torch.zeros(b, max_new_tokens, dtype=torch.float32)
        scores = []
        steps = 0
        for step in range(max_new_tokens):
            step_scores = torch.full((b, rows.logits[0].shape[-1]), float("-inf"))
            for r in range(b):
                if finished[r]:
                    continue
                row_logits = rows.logits[r][:vocab]
                step_scores[r, :vocab] = row_logits.cpu()
                nxt = _sample_next(row_logits, temperature, top_k, samplers[r])
                new[r, step] = nxt
                count[r] += 1
                iter_out[r, step] = rows.iterations[r]
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
            rows.step(new[:, step], [r for r in range(b) if not finished[r]])
        self.train(was_training)
        sequences = torch.cat([input_ids, new[:, :steps]], dim=1)
        iter_out = iter_out[:, :steps]
        self.last_generation_iterations = [iter_out[r, :count[r]].tolist() for r in range(b)]
        if return_dict_in_generate:
            return MegaponderGenerateOutput(sequences=sequences, iterations=iter_out,
                                            scores=tuple(scores) if output_scores else None)
        return sequences


class _RowByRow:
    """Latent families: one decoder (one cache) per row, fed the row's real tokens; rows
    advance in lockstep so batch-level stopping criteria see the whole batch."""

    def __init__(self, model, seed, prompts):
        self.decoders = [make_decoder(model, seed) for _ in prompts]
        self.logits = [d.feed(p.unsqueeze(0))[0, -1].float() for d, p in zip(self.decoders, prompts)]
        self.iterations = [d.last_iterations()[0] for d in self.decoders]

    def step(self, tokens, alive):
        for r in alive:
            self.logits[r] = self.decoders[r].feed(tokens[r].view(1, 1))[0, -1].float()
            self.iterations[r] = self.decoders[r].last_iterations()[0]


class _Lockstep:
    """Vertical families and loop: the whole left-padded batch in one decoder (batched
    caches, cross-row compaction of the active tokens); padding is hidden from attention,
    positions count a row's real tokens, each row draws the halting plan of a lone row (row 0
    of stream ``seed`` at its own positions), so a row's tokens are those it gets alone. Finished rows keep being fed (token 0) and are
    ignored."""

    def __init__(self, model, seed, input_ids, mask):
        self.decoder = make_decoder(model, seed, rows=input_ids.shape[0])
        out = self.decoder.feed(input_ids, mask)
        self.logits = [row.float() for row in out[:, -1]]
        self.iterations = self.decoder.last_iterations()

    def step(self, tokens, alive):
        ids = torch.zeros_like(tokens)   # finished rows: any valid id (pad_token_id may be -1)
        ids[alive] = tokens[alive]
        out = self.decoder.feed(ids.view(-1, 1))
        for r in alive:
            self.logits[r] = out[r, -1].float()
        self.iterations = self.decoder.last_iterations()


def _sample_next(logits, temperature: float, top_k: int, generator) -> int:
    # megaponder.infer.sample_next: on the CPU with a CPU generator, so a seed gives the same
    # tokens on any device
    logits = logits.detach().float().cpu()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


# ----------------------------------------------------------------------------------------
# KV-cached decoders (megaponder/models/decoders.py, one row each)
# ----------------------------------------------------------------------------------------
class _ReuseKV:
    """K,V <- where(active, K_new, K_prev): a halted token keeps its last active K/V."""

    def __init__(self, active, prev_kv):
        self.active, self.prev_kv = active, prev_kv

    def __call__(self, layer, k, v):
        m = self.active[:, None, :, None]
        k_prev, v_prev = self.prev_kv[layer]
        return torch.where(m, k, k_prev), torch.where(m, v, v_prev)


def _cat(past, new):
    return new if past is None else torch.cat([past, new], dim=2)


def _pack(mask):
    counts = mask.sum(1)
    width = int(counts.max())
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


class VerticalDecoder:
    """ponderlm / adaponderlm / fixed_pruning / random_halting: one K/V cache per iteration
    and layer; iteration i computes only the still-active tokens, a halted token's K/V of its
    last active iteration is copied into the later caches without compute."""

    def __init__(self, model, seed: int = 0, rows: int = 1):
        self.model = model
        self.passes = model.num_passes
        self.adaptive = model.adaptive
        self.layers = len(model.stack.layers)
        self.caches = [[None] * self.layers for _ in range(self.passes)]
        self.tc = 0
        self.activity = []
        # the halting draws' stream (megaponder's decoder: its seed)
        self.seed = seed
        self.key_mask = None   # [B, Tc] True for real (non-padding) keys
        self.seen = None       # [B] real tokens fed so far (the next position)

    def _positions(self, ids, mask):
        """Positions of a chunk (a row's real tokens count from 0) and the key padding mask
        over cache + chunk (None while nothing is padding)."""
        b, n = ids.shape
        seen = self.seen if self.seen is not None else torch.zeros(b, dtype=torch.long, device=ids.device)
        pos = (seen.unsqueeze(1) + mask.long().cumsum(1) - 1).clamp_min(0)
        self.seen = seen + mask.long().sum(1)
        self.key_mask = mask if self.key_mask is None else torch.cat([self.key_mask, mask], dim=1)
        return pos, (None if bool(self.key_mask.all()) else self.key_mask)

    def _draws(self, pos):
        """Halting priorities u [B, n] of megaponder's decoder for one row at the row's real
        token positions: every row draws as row 0 of stream ``seed``, so a row's plan (and its
        tokens) are those it gets alone, whatever the batch (padding slots get some number,
        never used: padding stops after the first iteration)."""
        rows = torch.zeros(pos.shape, dtype=torch.long)
        return self.model.eval_uniforms(rows, pos.cpu(), self.seed, salt=2)

    def _pass(self, i, e, pos, idx, valid, active, chunk_prev, key_mask):
        new_chunk = [None] * self.layers
        cache = self.caches[i]
        rows, slots = (valid & active.gather(1, idx)).nonzero(as_tuple=True)
        tokens = idx[rows, slots]

        def written(prev, new):
            out = prev.clone()
            out[rows, :, tokens] = new[rows, :, slots]
            return out

        def hook(layer, k, v):
            if chunk_prev is None:
                ck, cv = k, v
            else:
                ck, cv = written(chunk_prev[layer][0], k), written(chunk_prev[layer][1], v)
            new_chunk[layer] = (ck, cv)
            past = cache[layer]
            if past is None:
                return ck, cv
            return _cat(past[0], ck), _cat(past[1], cv)

        d = e.shape[-1]
        spec = AttentionSpec(q_index=self.tc + idx, key_padding_mask=key_mask)
        hidden, _ = self.model.stack(e.gather(1, idx.unsqueeze(-1).expand(-1, -1, d)),
                                     pos.gather(1, idx), spec, kv_hook=hook)
        return hidden, new_chunk

    def feed(self, ids, mask=None):
        """ids [B, n] -> logits [B, n, V]; ``mask`` [B, n] marks real tokens (False: left
        padding, computed at the first iteration only and never attended to)."""
        m, P = self.model, self.passes
        b, n = ids.shape
        dev = ids.device
        mask = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask.bool().to(dev)
        pos, key_mask = self._positions(ids, mask)
        e = m.input_embeddings(ids)
        readout = None
        active = torch.ones(b, n, dtype=torch.bool, device=dev)
        plan = None
        if m.family in PLANNED:
            plan = m.threshold_plan(self._draws(pos).to(dev))
        final_readout = self.adaptive and m.ponder_cfg.halted_readout == "final"
        acts = [active.clone()]
        chunk_prev = None
        for i in range(P):
            last = i == P - 1
            compute_mask = active | (final_readout and last)
            if not compute_mask.any():
                new_chunk = chunk_prev
                if not last:
                    acts.append(active.clone())
            else:
                idx, valid = _pack(compute_mask)
                hidden, new_chunk = self._pass(i, e, pos, idx, valid, active, chunk_prev, key_mask)
                logits = m.head(hidden)
                if readout is None:
                    readout = torch.zeros(b, n, logits.shape[-1], dtype=logits.dtype, device=dev)
                rows, slots = valid.nonzero(as_tuple=True)
                readout[rows, idx[rows, slots]] = logits[rows, slots]
                if not last:
                    if plan is not None:
                        cont, s = plan[i + 1].gather(1, idx) & valid, None
                    elif self.adaptive:
                        s = m.gate_values(i, hidden)
                        cont = valid & (s >= m.ponder_cfg.tau)
                    else:
                        cont, s = valid, None
                    cont = cont & mask.gather(1, idx)   # padding stops after the first iteration
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

    def last_iterations(self) -> list:
        """Iterations the last fed token of each row executed."""
        return [float(x) for x in self.activity[-1][:, :, -1].sum(0).tolist()]


class LoopDecoder(VerticalDecoder):
    def feed(self, ids, mask=None):
        m = self.model
        b, n = ids.shape
        mask = torch.ones(b, n, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
        pos, key_mask = self._positions(ids, mask)
        x = m.input_embeddings(ids)
        spec = AttentionSpec(q_index=torch.arange(self.tc, self.tc + n, device=ids.device),
                             key_padding_mask=key_mask)
        for i in range(self.passes):
            cache = self.caches[i]

            def hook(layer, k, v, cache=cache):
                past = cache[layer]
                cache[layer] = (k, v) if past is None else (_cat(past[0], k), _cat(past[1], v))
                return cache[layer]

            x, _ = m.stack(x, pos, spec, kv_hook=hook, apply_final_norm=False)
        self.tc += n
        self.activity.append(torch.ones(self.passes, b, n, dtype=torch.bool))
        return m.head(m.stack.final_norm(x))


class LatentDecoder:
    """ponderlm2 / ponderlm3 / pause, token by token: each step of a token runs with the
    cache (token embedding, then every thought fed back); PonderLM-3 runs only the steps
    whose survival w >= tau and keeps their log w as an additive key bias."""

    def __init__(self, model, seed: int = 0):
        self.model = model
        self.layers = len(model.stack.layers)
        self.cache = [None] * self.layers
        self.key_bias = None
        self.tc = 0
        self.steps_executed = []
        self.is_p3 = model.family == "ponderlm3"
        self.tc_token = 0

    def _step(self, x, pos, new_bias, own):
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

    def feed(self, ids):
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
                    x = (m.pause_embedding.detach().to(h.dtype) * m.embed_scale).view(1, 1, -1)
                else:
                    x = hs[-1]
                bias = float(log_w[k]) if self.is_p3 else 0.0
                hs.append(self._step(x, pos, bias, k))
            if self.is_p3:
                w = s[:n_steps]
                if m.ponder_cfg.renormalize_pruned:
                    w = w / w.sum()
                hmix = torch.einsum("btk,btkd->btd", w.to(h.dtype).view(1, 1, -1),
                                    torch.stack(hs, dim=2))
                out.append(m.head(hmix))
            else:
                out.append(m.head(hs[-1]))
            self.steps_executed.append(n_steps)
            self.tc_token += 1
        return torch.cat(out, dim=1)

    def last_iterations(self) -> list:
        return [float(self.steps_executed[-1])]


def make_decoder(model, seed: int = 0, rows: int = 1):
    if model.family in LATENT:
        return LatentDecoder(model, seed)
    if model.family == "loop":
        return LoopDecoder(model, seed, rows)
    return VerticalDecoder(model, seed, rows)
