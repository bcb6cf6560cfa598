"""The Hugging Face config of an exported megaponder model (``model_type`` "megaponder").

It carries megaponder's whole training config (``megaponder_config``): the model and ponder
sections build the model (models/args.py, ponder_args.py; hf_model.py), and ``--from hf --to megaponder``
restores the same checkpoint from it. The usual Hugging Face names (``hidden_size``,
``num_hidden_layers``, ...) are derived from the model section for tools that read them.

Imports transformers, so only the export's wrapper (hf_model.py) and the exporter import it;
copied verbatim into every export (docs/architecture.md).
"""
from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig

from .args import ModelConfig


class MegaponderConfig(PretrainedConfig):
    model_type = "megaponder"

    def __init__(self, megaponder_config: Optional[dict] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, **kwargs):
        self.megaponder_config = dict(megaponder_config or {})
        m = ModelConfig(**self.megaponder_config.get("model", {}))
        self.family, self.backbone = m.family, m.backbone
        self.vocab_size, self.tokenizer_vocab_size = m.padded_vocab(), m.vocab_size
        self.hidden_size, self.num_hidden_layers = m.hidden_size, m.num_layers
        self.num_attention_heads, self.num_key_value_heads = m.num_heads, m.kv_heads
        self.intermediate_size, self.max_position_embeddings = m.ffn_size, m.max_position_embeddings
        # derived: never read back from config.json
        for key in ("family", "backbone", "vocab_size", "tokenizer_vocab_size", "hidden_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "max_position_embeddings", "tie_word_embeddings"):
            kwargs.pop(key, None)
        # set explicitly: transformers 5 no longer gives every config these attributes, and an
        # export without a tokenizer has neither
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=m.tie_word_embeddings, **kwargs)
