"""Train a tokenizer on a JSON-lines corpus (the engine behind ``tools/train_tokenizer.py``).

Two kinds, both usable by ``preprocess_data.py`` and ``data.tokenizer_model`` as they are:

- ``sentencepiece`` → ``.model``: SentencePiece BPE (or unigram). ``<|endoftext|>`` is a
  user-defined symbol (the end-of-document id), byte fallback is on by default (characters not
  seen in training become byte pieces instead of ``<unk>``), and ``\\n`` is a user-defined
  symbol with ``newlines="keep"`` (SentencePiece's normaliser otherwise turns every newline,
  like every tab, into a space).
- ``hf-bpe`` → ``.json``: Hugging Face ``tokenizers`` byte-level BPE in the GPT-NeoX layout:
  ``<|endoftext|>`` = 0 (end of document), ``<|padding|>`` = 1, then the 256 byte symbols and
  the merges. Byte-level means no unknown token and every byte (newlines, tabs, any script)
  round-trips exactly; byte fallback is therefore implied.

Records are read with the preprocessor's parser, so bad lines are skipped and counted the same way.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from typing import Iterator, Optional

from ..errors import DataError
from ..safe_files import write_atomic
from .preprocess import _category, _parse_line, open_input
from .tokenizer import EOD_PIECE

KINDS = ("sentencepiece", "hf-bpe")
PAD_PIECE = "<|padding|>"


def iter_texts(paths: list[str], keys: list[str], max_documents: Optional[int],
               bad: Counter) -> Iterator[str]:
    """Every text of ``keys`` in ``paths`` (jsonl, .gz, .zst); bad records counted in ``bad``."""
    n = 0
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"--input {path} does not exist.")
        with open_input(path) as f:
            for raw in f:
                found, problems = _parse_line(raw.rstrip(b"\r\n"), keys)
                for _, reason in problems:
                    bad[_category(reason)] += 1
                for parts in found.values():
                    for text in parts:
                        try:
                            text.encode("utf-8")
                        except UnicodeEncodeError:  # lone surrogate: not text
                            bad["undecodable text"] += 1
                            continue
                        if text:
                            yield text
                n += 1
                if max_documents is not None and n >= max_documents:
                    return


def train_sentencepiece(texts: Iterator[str], output: str, vocab_size: int, *,
                        model_type: str = "bpe", byte_fallback: bool = True,
                        newlines: str = "keep", seed: int = 1234, threads: int = 1) -> None:
    import sentencepiece as spm

    symbols = [EOD_PIECE] + (["\n"] if newlines == "keep" else [])

    def sentences():
        # SentencePiece trains on "sentences" (skipping any longer than max_sentence_length),
        # so documents go in line by line; with newlines kept, "\n" is a symbol that the
        # encoder always extracts whole, so it needs no training frequency.
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    spm.set_random_generator_seed(seed)  # its sentence sampling: reproducible models
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, byte_fallback=byte_fallback,
            user_defined_symbols=symbols, num_threads=threads, minloglevel=2,
            shuffle_input_sentence=False, remove_extra_whitespaces=newlines != "keep")
    except RuntimeError as e:  # e.g. "Vocabulary size too high": say it as a user error
        raise DataError(f"SentencePiece training failed: {' '.join(str(e).split())}") from None
    _write_atomically(output, buf.getvalue())


def train_hf_bpe(texts: Iterator[str], output: str, vocab_size: int, *,
                 min_frequency: int = 2) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2/NeoX style: no prefix space, byte-level pre-tokenizer and decoder
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_PIECE, PAD_PIECE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    _write_atomically(output, tok.to_str(pretty=False).encode("utf-8"))


def _write_atomically(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, data)  # replaced only by a complete one; never written through a link


def train_tokenizer(inputs: list[str], keys: list[str], kind: str, output: str, vocab_size: int,
                    *, max_documents: Optional[int] = None, **options) -> dict:
    """Train, write ``output`` and return a summary (vocab size, eod/pad ids, bad records)."""
    from .tokenizer import build_tokenizer

    if kind not in KINDS:
        raise DataError(f"unknown tokenizer kind '{kind}'; use one of {KINDS}.")
    bad: Counter = Counter()
    texts = iter_texts(inputs, keys, max_documents, bad)
    if kind == "sentencepiece":
        train_sentencepiece(texts, output, vocab_size, **options)
        tok = build_tokenizer("SentencePieceTokenizer", output)
    else:
        train_hf_bpe(texts, output, vocab_size, **options)
        tok = build_tokenizer("HFTokenizer", output)
    return {"output": output, "kind": kind, "vocab_size": tok.vocab_size, "eod": tok.eod,
            "pad": tok.pad, "bad_records": sum(bad.values()), "bad_by_reason": dict(bad),
            "tokenizer_type": type(tok).__name__}
