"""megaponder tokenizers as Hugging Face fast tokenizers (``AutoTokenizer.from_pretrained``).

* SentencePiece models (the demo corpus's ``tokenizer.model``) are converted to a
  ``tokenizer.json`` with transformers' own SentencePiece converter
  (``SpmConverter.build_tokenizer_from_spm_proto``), which follows the model's normalizer spec
  (dummy prefix, whitespace handling, byte fallback, user-defined pieces such as
  ``<|endoftext|>``); tests/test_hf_export.py checks it encodes like SentencePiece.
* ``tokenizers`` json files are copied unchanged.

Both get a ``tokenizer_config.json`` naming megaponder's end-of-document token as ``eos_token``
(what ``megaponder generate`` stops at) and its padding token, and no BOS: megaponder trains
without one, documents are separated by the end-of-document token, so that is also the right
prefix for tools such as lm-eval that fall back from BOS to EOS.
"""
from __future__ import annotations

import os
import shutil

from ..data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer


def _fast_backend(tok: Tokenizer):
    """(tokenizers.Tokenizer, special-token strings) of a megaponder tokenizer."""
    if isinstance(tok, SentencePieceTokenizer):
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
            import transformers

            raise ValueError(f"converting {tok.path} to a fast tokenizer needs transformers >= 5 "
                             f"(installed: {transformers.__version__}); pip install -U transformers")
        proto = import_protobuf().ModelProto()
        with open(tok.path, "rb") as f:
            proto.ParseFromString(f.read())
        if proto.trainer_spec.model_type not in (1, 2):
            raise ValueError(f"{tok.path}: only unigram and BPE SentencePiece models convert to a "
                             f"fast tokenizer (model_type={proto.trainer_spec.model_type})")
        if proto.trainer_spec.model_type == 2:
            vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        else:
            vocab = [(p.piece, p.score) for p in proto.pieces]
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
        sp = tok.sp
        special = {"eos_token": sp.id_to_piece(tok.eod), "pad_token": sp.id_to_piece(tok.pad)}
        if sp.unk_id() >= 0:
            special["unk_token"] = sp.id_to_piece(sp.unk_id())
        return backend, special
    assert isinstance(tok, HFTokenizer)
    return tok.tk, {"eos_token": tok.tk.id_to_token(tok.eod), "pad_token": tok.tk.id_to_token(tok.pad)}


def export_tokenizer(path: str, output: str, model_max_length: int | None = None) -> Tokenizer:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` for megaponder tokenizer ``path``
    into ``output``; returns the megaponder tokenizer (its eod/pad ids go into config.json)."""
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer(None, path)
    backend, special = _fast_backend(tok)
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    if isinstance(tok, SentencePieceTokenizer):
        # SentencePiece never parses control pieces (<unk>, <s>) out of text, and it applies
        # the dummy prefix before isolating user-defined ones (<|endoftext|>); transformers'
        # added-token splitting would do neither. The converted pipeline handles user-defined
        # pieces itself, so the special tokens are not split out of text.
        kwargs["split_special_tokens"] = True
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   **special, **kwargs)
    fast.save_pretrained(output)
    if isinstance(tok, HFTokenizer):  # the original file, byte for byte
        shutil.copyfile(path, os.path.join(output, "tokenizer.json"))
    return tok
