"""Configuration of a megaponder pondering model exported to Hugging Face.

Self-contained (imports transformers only): copied next to the weights by
``tools/convert_checkpoint.py --from megaponder --to hf`` and loaded with
``trust_remote_code=True``.
"""
from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig

REMOTE_FAMILIES = ("ponderlm", "adaponderlm", "ponderlm2", "ponderlm3",
                   "loop", "pause", "fixed_pruning", "random_halting")


class MegaponderConfig(PretrainedConfig):
    """Backbone shape (Hugging Face names; ``backbone`` neox or llama, ``num_key_value_heads``
    for the llama backbone's grouped-query attention) plus the pondering family and its settings.

    ``ponder`` holds megaponder's ``ponder:`` section verbatim (gate/router sizes, tau, Jacobi
    passes, ...), ``keep_fractions`` the calibrated per-iteration kept fraction of the
    fixed_pruning / random_halting baselines, and ``megaponder_config`` the whole training
    config, so that ``--from hf --to megaponder`` restores the same model exactly.
    """

    model_type = "megaponder"

    def __init__(self, family: str = "ponderlm", vocab_size: int = 8192,
                 tokenizer_vocab_size: Optional[int] = None, hidden_size: int = 128,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 intermediate_size: Optional[int] = None, max_position_embeddings: int = 2048,
                 rotary_pct: float = 0.25, rotary_emb_base: float = 10000.0,
                 use_parallel_residual: bool = True, layer_norm_eps: float = 1e-5,
                 tie_word_embeddings: bool = False, ponder: Optional[dict] = None,
                 keep_fractions: Optional[list] = None, megaponder_config: Optional[dict] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 backbone: str = "neox", num_key_value_heads: Optional[int] = None,
                 **kwargs):
        if family not in REMOTE_FAMILIES:
            raise ValueError(f"MegaponderConfig: unknown family '{family}'; expected one of "
                             f"{list(REMOTE_FAMILIES)} (vanilla exports as GPTNeoXForCausalLM / LlamaForCausalLM)")
        if backbone not in ("neox", "llama"):
            raise ValueError(f"MegaponderConfig: unknown backbone '{backbone}'; expected 'neox' "
                             f"or 'llama'")
        self.family = family
        self.backbone = backbone
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size or vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_parallel_residual = use_parallel_residual
        self.layer_norm_eps = layer_norm_eps
        self.ponder = dict(ponder or {})
        self.keep_fractions = keep_fractions
        self.megaponder_config = megaponder_config
        # set explicitly: transformers 5 no longer gives every config these attributes, and
        # an export without a tokenizer has neither
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
