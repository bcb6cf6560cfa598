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
    tokenizer_type: Optional[Literal["SentencePieceTokenizer", "HFTokenizer"]] = param(
        None, "Tokenizer implementation; null (the default): what data.tokenizer_model holds. "
        "When it names the other kind, the file wins and one note says so.")
    tokenizer_model: Optional[str] = param(None, "Tokenizer: a SentencePiece .model, a "
                                           "tokenizer.json, a GPT-2 vocab.json (merges.txt "
                                           "next to it) or a folder holding one of those.")
    eod_token: Optional[str] = param(None, "End-of-document token (e.g. '<|end_of_text|>'); null: "
                                     "the one the data's .meta.json records, else the first of "
                                     "<|endoftext|>, <|end_of_text|>, </s>, <eos>, ... the "
                                     "tokenizer has.")
    index_mode: Literal["pythia", "megatron"] = param(
        "pythia", "Sample-index algorithm: GPT-NeoX/Pythia order or megatron-core's.")
    index_cache_dir: Optional[str] = param(None, "Where doc/sample/shuffle index caches go; null "
                                           "puts them next to the data.")
    reset_position_ids: bool = param(False, "Document-aware packing: restart positions after EOD.")
    reset_attention_mask: bool = param(False, "Document-aware packing: attend only within a document.")
    num_workers: int = param(0, "DataLoader worker processes.")
