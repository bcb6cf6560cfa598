"""``data:`` — which indexed datasets feed training and how samples are built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .base import param


@dataclass
class DataConfig:
    path: Optional[list[str]] = param(None, "Indexed-dataset prefix(es) (files PREFIX.bin/.idx). "
                                      "For blending, alternate weights and prefixes as in "
                                      "Megatron: [0.7, a, 0.3, b].")
    valid_path: Optional[list[str]] = param(None, "Validation prefix(es); null carves validation "
                                            "out of data.path using data.split.")
    split: str = param("969,30,1", "train,valid,test proportions when valid_path is null "
                       "(GPT-NeoX convention).")
    seq_length: int = param(128, "Tokens per training sample (each sample reads seq_length+1).")
    tokenizer_type: Literal["SentencePieceTokenizer", "HFTokenizer"] = param(
        "SentencePieceTokenizer", "Tokenizer implementation used to decode/encode text.")
    tokenizer_model: Optional[str] = param(None, "Tokenizer file (.model for SentencePiece, "
                                           "tokenizer .json for HF).")
    index_mode: Literal["pythia", "megatron"] = param(
        "pythia", "Sample-index algorithm: GPT-NeoX/Pythia order or megatron-core's.")
    index_cache_dir: Optional[str] = param(None, "Where doc/sample/shuffle index caches go; null "
                                           "puts them next to the data.")
    reset_position_ids: bool = param(False, "Document-aware packing: restart positions after EOD.")
    reset_attention_mask: bool = param(False, "Document-aware packing: attend only within a document.")
    num_workers: int = param(0, "DataLoader worker processes.")
